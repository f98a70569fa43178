"""Codenames: the run name MLflow generates (e.g. ``fearless-eel-256``), made unique.

A codename is unique when no other run in the tracking store carries it as its run name and no
git tag ``model/<codename>`` exists in the repository. A colliding (or malformed) name is
replaced by a fresh one of the same form from nf1prov's own word lists (MLflow's generator is a
private function that may change between releases).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from nf1prov import git, tracking
from nf1prov.errors import UserError

MAX_ATTEMPTS = 50


# Words of the run names MLflow generates, e.g. fearless-eel-256: an adjective and a noun.
ADJECTIVES = (
    "agile amazing ambitious bald beautiful big bold brave bright calm capable casual caring "
    "clean clever colorful crawling dapper defiant delicate enchanting entertaining fearless "
    "fun gentle glamorous gregarious handsome honorable illustrious industrious judicious "
    "kindly languid likeable loud luminous marvelous mysterious nimble placid polite popular "
    "puzzled redolent righteous rogue rumbling salty secretive selective sedate serious shivering "
    "skillful smiling sneaky spiffy stately suave thoughtful tasteful treasured unequaled "
    "upbeat useful valuable victorious vaunted wise worried zealous"
).split()
NOUNS = (
    "ant ape asp auk bass bat bear bee bird boar bug calf carp cat chimp cod colt conch cow crab "
    "crane croc crow cub deer doe dog dolphin donkey dove duck eel elk fawn finch fish flea fly "
    "foal fowl fox frog gnat gnu goat goose grouse gull hare hawk hen hog horse hound jay kit "
    "kite koi lamb lark loon lynx mare midge mink mole moose moth mouse mule newt owl ox panda "
    "penguin perch pig pug quail ram rat ray robin roo rook seal shad shark sheep shoat shrew "
    "shrike skink skunk sloth slug smelt snail snake snipe sow sponge squid squirrel stag steed "
    "stoat stork swan tern toad trout turtle vole wasp whale wolf worm wren yak zebra"
).split()


def generate() -> str:
    """A fresh codename of the form MLflow gives run names: adjective-noun-number (0-999)."""
    return (f"{secrets.choice(ADJECTIVES)}-{secrets.choice(NOUNS)}-"
            f"{secrets.randbelow(1000)}")


def is_taken(client, name: str, run_id: str, root: Path | None) -> bool:
    """True when ``name`` is unusable for run ``run_id``: malformed, used by another run in the
    store (any experiment), or already a ``model/<name>`` tag in the repository."""
    if not git.CODENAME_RE.match(name or ""):
        return True
    if any(run.info.run_id != run_id for run in tracking.runs_by_codename(client, name)):
        return True
    return root is not None and git.tag_sha(root, git.MODEL_TAG_PREFIX + name) is not None


def make_unique(client, run_id: str, root: Path | None) -> str:
    """Keep the run's current name when it is unique, else rename the run; returns the name."""
    name = client.get_run(run_id).info.run_name
    for _ in range(MAX_ATTEMPTS):
        if not is_taken(client, name, run_id, root):
            break
        name = generate()
    else:  # pragma: no cover - 50 collisions in a row would mean a broken generator
        raise UserError("Could not find an unused codename after 50 attempts; the tracking "
                        "store seems to hold an unusual number of runs. Try again.")
    if client.get_run(run_id).info.run_name != name:
        client.update_run(run_id, name=name)
    client.set_tag(run_id, tracking.CODENAME, name)
    return name
