"""Secrets never enter a model commit (DESIGN 3.2): by name, and by the content of every new or
changed file (private keys anywhere in a line, well-known token shapes, literal passwords),
with a committed allow-list for a known false positive. The fake secrets are made at run time,
so that this file itself holds none (the scan of this repository's own files finds nothing)."""

from __future__ import annotations

import base64
import random
import re
import string
import subprocess
import time
from pathlib import Path

import pytest

from nf1prov import git
from nf1prov.errors import UserError
from nf1prov.provenance import preflight, secret_scan
from tests.conftest import REPO_ROOT, run_git

RNG = random.Random(24)
ALNUM = string.ascii_letters + string.digits


def token(length: int, alphabet: str = ALNUM) -> str:
    return "".join(RNG.choice(alphabet) for _ in range(length))


def private_key(kind: str = "") -> str:
    """A PEM block of random bytes (no real key), BEGIN line split so this source holds none."""
    body = base64.b64encode(RNG.randbytes(900)).decode()
    lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    label = f"{kind} PRIVATE KEY".strip()
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n"


def aws_key_id() -> str:
    return "AK" + "IA" + token(16, string.ascii_uppercase + string.digits)


def aws_secret() -> str:
    return token(40, ALNUM + "/+")


def service_account_json() -> str:
    escaped = private_key().replace("\n", "\\n")
    return ('{\n  "type": "service_account",\n  "project_id": "nf1-lab",\n'
            f'  "private_key_id": "{token(40, "0123456789abcdef")}",\n'
            f'  "private_key": "{escaped}",\n'
            '  "client_email": "trainer@nf1-lab.iam.gserviceaccount.com"\n}\n')


def kinds(text: str, path: str = "settings.py") -> list[tuple[int, str]]:
    return [(f.line, f.kind) for f in secret_scan.scan_text(text, path)]


# --- the scanner on strings -------------------------------------------------------------------


@pytest.mark.parametrize("path, text, line, kind", [
    ("notes.txt", lambda: "key backup:\n" + private_key("RSA"), 2, "a private key"),
    ("deploy.py", lambda: f'KEY = """{private_key("OPENSSH")}"""\n', 1, "a private key"),
    ("sa.json", service_account_json, 5, "a private key"),
    ("train.py", lambda: f'client = boto3.client("s3", aws_access_key_id="{aws_key_id()}")\n',
     1, "an AWS access key ID"),
    ("train.py", lambda: f'AWS_SECRET_ACCESS_KEY = "{aws_secret()}"\n', 1,
     "an AWS secret access key"),
    ("credentials.ini", lambda: f"[default]\naws_secret_access_key = {aws_secret()}\n", 2,
     "an AWS secret access key"),
    ("sts.json", lambda: f'{{"SecretAccessKey": "{aws_secret()}"}}\n', 1,
     "an AWS secret access key"),
    ("setup.py", lambda: f'os.environ["AWS_SECRET_ACCESS_KEY"] = "{aws_secret()}"\n', 1,
     "an AWS secret access key"),
    # the AWS documentation's example pair, under names that do not say AWS
    ("s3.py", lambda: 'import boto3\nsecret_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY' 'EXAMPLEKEY"\n',
     2, "an AWS secret access key"),
    ("s3.py", lambda: 'key_id = "AKIA' 'IOSFODNN7EXAMPLE"\n', 1, "an AWS access key ID"),
    # a whole block, however short its made-up body
    ("sa.json", lambda: '{"private_key": "-----BEGIN ' 'PRIVATE KEY-----\\nMIIEfake\\n-----END '
     'PRIVATE KEY-----\\n"}\n', 1, "a private key"),
    ("push.sh", lambda: f"git push https://{'gh' + 'p_' + token(36)}@github.com/x/y\n", 1,
     "a GitHub token"),
    ("ci.yml", lambda: f"token: {'gh' + 'o_' + token(36)}\n", 1, "a GitHub token"),
    ("ci.yml", lambda: f"token: {'github' + '_pat_' + token(82, ALNUM + '_')}\n", 1,
     "a GitHub token"),
    ("ci.env", lambda: f"GL={'glp' + 'at-' + token(20)}\n", 1, "a GitLab token"),
    ("notify.py", lambda: f'SLACK = "{"xo" + "xb-" + token(12, string.digits)}-{token(24)}"\n',
     1, "a Slack token"),
    ("maps.js", lambda: f'const k = "{"AI" + "za" + token(35, ALNUM + "_-")}";\n', 1,
     "a Google API key"),
    ("db.py", lambda: f'\n\npassword = "{token(16, ALNUM + "!@#%")}"\n', 3,
     "a literal value assigned to 'password'"),
    (".env.local", lambda: f"# lab\nDB_PASSWORD={token(20)}\n", 2,
     "a literal value assigned to 'DB_PASSWORD'"),
    ("config.yaml", lambda: f"tracking:\n  api_key: {token(32)}\n", 2,
     "a literal value assigned to 'api_key'"),
    ("keys.json", lambda: f'{{"secret": "{token(24)}"}}\n', 1,
     "a literal value assigned to 'secret'"),
    ("run.sh", lambda: f"export WANDB_API_KEY={token(40, '0123456789abcdef')}\n", 1,
     "a literal value assigned to 'WANDB_API_KEY'"),
    ("store.toml", lambda: f'uri = "postgresql://lab:{token(18)}@db.lab.org/mlflow"\n', 1,
     "a password in a URL"),
])
def test_secrets_are_found_by_content(path, text, line, kind):
    found = kinds(text(), path)
    assert (line, kind) in found, found


@pytest.mark.parametrize("path, text", [
    ("db.py", 'password = os.environ["DB_PASSWORD"]\n'),
    ("db.py", 'password = os.environ.get("DB_PASSWORD", "")\n'),
    ("db.py", "token = get_token(args.user)\n"),
    ("db.py", "password = self.password\n"),
    ("db.py", 'secret = f"{prefix}-{suffix}"\n'),
    ("db.py", 'secret_key = "dev"\n'),
    ("db.py", "max_tokens = 4096\n"),
    ("db.py", 'token_file = "/run/secrets/mlflow_token"\n'),
    ("db.py", 'API_KEY_VARIABLE = "NF1PROV_API_KEY"\n'),
    (".env.example", "PASSWORD=changeme\nAPI_KEY=<your-token>\nSECRET=xxx\n"),
    (".env.example", "TOKEN=xxxxxxxxxxxxxxxxxxxxxxxx\nDB_PASSWORD=${DB_PASSWORD}\n"),
    ("config.yaml", "api_key: YOUR_API_KEY_HERE\npassword: '{{ vault_password }}'\n"),
    ("README.md", "export NF1PROV_SEARCH_STORAGE=postgresql+psycopg2://nf1:SECRET@db:5432/x\n"),
    ("README.md", "mlflow server --backend-store-uri postgresql://mlflow:PASSWORD@dbhost/m\n"),
    ("test_x.py", 'secret = "postgresql+psycopg2://lab:s3cret@db/optuna"\n'),
    ("README.md", "the token: model/<codename> names the commit\n"),
    ("keys.py", 'print("-----BEGIN PRIVATE KEY-----")  # a marker, no key\n'),
    ("keys.py", 'MARKER = "-----BEGIN " + "PRIVATE KEY-----"\n'),
    ("ci.yml", "token: ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n"),
    ("catalog.py", 'UPSTREAM_SHA = "07e0368d2d435e4ad04902e242cfee934adc50e0"\n'),
])
def test_placeholders_and_references_are_not_secrets(path, text):
    assert kinds(text, path) == []


def test_a_finding_never_holds_the_secret():
    secret = aws_secret()
    (finding,) = secret_scan.scan_text(f'AWS_SECRET_ACCESS_KEY = "{secret}"\n', "a.py")
    assert secret not in repr(finding) and secret[:8] not in repr(finding)
    assert re.fullmatch(r"[0-9a-f]{12}", finding.fingerprint)


# --- what preflight refuses -------------------------------------------------------------------


@pytest.fixture
def committed(project):
    git.stage_all(project)
    git.commit(project, "base\n")
    return project


def refusal(repo: Path, tracking_uri: str) -> str:
    """Preflight's UserError message; the repository (HEAD, index, status) unchanged."""
    index = git.index_path(repo)
    before = (git.head_sha(repo), index.read_bytes(), git.status_porcelain(repo))
    with pytest.raises(UserError) as raised:
        preflight.preflight(config_path="configs/tiny.toml", tracking_uri=tracking_uri)
    assert (git.head_sha(repo), index.read_bytes(), git.status_porcelain(repo)) == before
    return str(raised.value)


def write(repo: Path, rel: str, text: str) -> None:
    path = repo / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_every_secret_lookalike_is_refused_by_name_and_line(committed, tracking_uri):
    """The files an outside check committed with exit 0: each named, content findings with
    their line and kind, the secrets themselves never printed."""
    secret, github = aws_secret(), "gh" + "p_" + token(36)
    by_name = {".envrc": "export AWS_PROFILE=lab\n", "token.txt": "hf-0123\n",
               "secrets/db.txt": "hunter2\n", ".kube/config": "apiVersion: v1\n",
               ".docker/config.json": '{"auths": {}}\n', "mlflow_credentials.txt": "lab\n",
               "wandb/settings": "[default]\nentity = nf1\n"}
    for rel, text in by_name.items():
        write(committed, rel, text)
    write(committed, "configs/gcp-lab.json", service_account_json())
    write(committed, "upload_weights.py", f'import boto3\n\nAWS_SECRET_ACCESS_KEY = "{secret}"\n')
    models = committed / "models" / "__init__.py"  # a tracked file, changed
    models.write_text(models.read_text() + f'\nGITHUB_TOKEN = "{github}"\n')
    line = models.read_text().count("\n")
    message = refusal(committed, tracking_uri)
    for rel in by_name:
        assert rel in message, rel
    assert "configs/gcp-lab.json:5: a private key" in message
    assert "upload_weights.py:3: an AWS secret access key" in message
    assert f"models/__init__.py:{line}: a GitHub token" in message
    assert secret not in message and github not in message and "MII" not in message
    assert secret_scan.ALLOW_FILE in message and ".gitignore" in message


def test_already_committed_lines_are_not_scanned_again(committed, tracking_uri):
    """A file committed with a lookalike (the user's decision) may change elsewhere; an
    unchanged committed file is not read at all."""
    write(committed, "tests/fixture.py", f'AWS_SECRET_ACCESS_KEY = "{aws_secret()}"\n')
    write(committed, "docs/old.md", f"password = {token(20)}\n")
    run_git(committed, "add", ".")
    run_git(committed, "commit", "-qm", "fixtures")
    with (committed / "tests" / "fixture.py").open("a") as handle:
        handle.write("OTHER = 1\n")
    plan = preflight.preflight(config_path="configs/tiny.toml", tracking_uri=tracking_uri)
    assert plan.root == committed
    with (committed / "tests" / "fixture.py").open("a") as handle:
        handle.write(f'aws_secret_key = "{aws_secret()}"\n')
    assert "tests/fixture.py:3: an AWS secret access key" in refusal(committed, tracking_uri)


def test_an_allow_listed_false_positive_passes(committed, tracking_uri):
    write(committed, "docs/example.yaml", f"# a made-up key for the docs\napi_key: {token(32)}\n")
    write(committed, "fixtures/.envrc", "layout python\n")
    message = refusal(committed, tracking_uri)
    fingerprint = re.search(r"docs/example\.yaml:2: .*?fingerprint ([0-9a-f]{12})",
                            message).group(1)
    # One allowed by fingerprint, the other by path; another file is still refused.
    write(committed, secret_scan.ALLOW_FILE,
          f"# reviewed like code: each line says why\n"
          f"docs/example.yaml {fingerprint}  # a made-up key in an example\n"
          "fixtures/.envrc  # direnv layout only, no secrets\n")
    plan = preflight.preflight(config_path="configs/tiny.toml", tracking_uri=tracking_uri)
    assert plan.root == committed
    write(committed, "docs/other.yaml", f"api_key: {token(32)}\n")
    message = refusal(committed, tracking_uri)
    assert "docs/other.yaml:1" in message and "docs/example.yaml" not in message


def test_an_allow_list_entry_by_line_and_a_malformed_one(committed, tracking_uri):
    write(committed, "deploy/staging.conf", f"# staging\nTOKEN={token(30)}\n")
    message = refusal(committed, tracking_uri)
    assert "deploy/staging.conf:2: a literal value assigned to 'TOKEN'" in message
    write(committed, secret_scan.ALLOW_FILE, "deploy/*.conf:2  # staging token, revoked\n")
    preflight.preflight(config_path="configs/tiny.toml", tracking_uri=tracking_uri)
    write(committed, secret_scan.ALLOW_FILE, "deploy/staging.conf:two\n")
    message = refusal(committed, tracking_uri)
    assert f"{secret_scan.ALLOW_FILE}:1" in message


def test_this_repositorys_own_files_hold_no_secret():
    """Every tracked file of this repository, scanned as if new (names and content): nothing,
    and fast enough for every `train` (measured: see docs/provenance.md)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.split("\0")
    tracked = [rel for rel in tracked if rel and (REPO_ROOT / rel).is_file()]
    started = time.perf_counter()
    found = secret_scan.find_secrets(REPO_ROOT, new=tracked, changed=[])
    elapsed = time.perf_counter() - started
    assert found == []
    assert elapsed < 5.0  # about 0.1 s on the development VM; generous for a busy CI machine
