"""Secrets in what a model commit would take (DESIGN 3.2): by name, and by content.

New files are judged by their name or path (`uncommittable.secret_name_reason`) and by their
content; tracked files the commit would change, by the lines that are not in HEAD (what is
already committed is never scanned again). Content rules: a private key block anywhere in a
line (also JSON-escaped), well-known token shapes (AWS, GitHub, GitLab, Slack, Google, ...), a
password in a URL, and a literal, high-entropy value assigned to a password/secret/token/key
name. A known false positive is allowed by a line of `ALLOW_FILE` at the repository root, which
is committed and reviewed like code. A finding names the file, the line and the kind of secret,
with a fingerprint (a truncated hash) to allow it by: never the secret itself.

Hand-written rules rather than detect-secrets: see docs/provenance.md ("Secrets").
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nf1prov import git
from nf1prov.errors import UserError
from nf1prov.provenance.uncommittable import secret_name_reason, unstage_advice

ALLOW_FILE = ".nf1prov-allow-secrets"
SCAN_BYTES = 1 << 20  # the first MiB of a text file: secrets sit in small files, data is large
BINARY_PROBE = 8000  # as git: a NUL byte in the first 8000 bytes makes a file binary


@dataclass(frozen=True)
class Finding:
    path: str
    line: int  # 1-based; 0 when the file's name or path is the finding
    kind: str  # "an AWS secret access key", "its name matches '.envrc'"
    fingerprint: str = ""  # 12 hex digits of the secret's SHA-256 ('' for a name)

    def describe(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        tail = f" (fingerprint {self.fingerprint})" if self.fingerprint else ""
        return f"{where}: {self.kind}{tail}"


# --- the content rules ------------------------------------------------------------------------
# Python's re scans fastest for a pattern that starts with a literal, so every rule is found
# from literals: a rule's regex runs only on text holding one of its prefixes, and assignments
# start from the secret-like words of a lower-cased copy (about 0.1 s for this repository).

PRIVATE_KEY_MARKER = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
# What may stand between the marker and the key's base64: newlines (also JSON-escaped), quotes
# of concatenated string literals, PEM headers (`Proc-Type: 4,ENCRYPTED`).
KEY_BODY = re.compile(r"(?:\\[rn]|[\s\"'+]|[A-Za-z-]+: [^\n\\]*)*([A-Za-z0-9+/]{40,})")
KEY_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
BLOCK_REACH = 8000  # characters in which a block's END line must follow (RSA 4096: ~3,300)

# (kind, literal prefixes, pattern whose group 1 is the secret): shapes specific enough to need
# no key name.
TOKEN_SHAPES = [(kind, prefixes, re.compile(pattern)) for kind, prefixes, pattern in (
    ("an AWS access key ID", ("AKIA", "ASIA", "ABIA", "ACCA"),
     r"\b((?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16})\b"),
    ("a GitHub token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
     r"\b((?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,}|github_pat_\w{50,})"),
    ("a GitLab token", ("glpat-", "glptt-", "gldt-", "glrt-", "glcbt-", "gloas-"),
     r"\b(gl(?:pat|ptt|dt|rt|cbt|oas)-[A-Za-z0-9_-]{20,})"),
    ("a Slack token", ("xoxa-", "xoxb-", "xoxp-", "xoxo-", "xoxs-", "xoxr-"),
     r"\b(xox[abposr]-[A-Za-z0-9-]{10,})"),
    ("a Slack webhook URL", ("hooks.slack.com/services/",),
     r"(hooks\.slack\.com/services/T\w+/B\w+/\w{16,})"),
    ("a Google API key", ("AIza",), r"\b(AIza[0-9A-Za-z_-]{35})(?![0-9A-Za-z_-])"),
    ("a Google OAuth client secret", ("GOCSPX-",), r"\b(GOCSPX-[A-Za-z0-9_-]{28})"),
    ("a Hugging Face token", ("hf_",), r"\b(hf_[A-Za-z]{34})\b"),
    ("a PyPI token", ("pypi-AgEIcHlwaS5vcmc",), r"\b(pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,})"),
    ("an npm token", ("npm_",), r"\b(npm_[A-Za-z0-9]{36})\b"),
    ("an OpenAI or Anthropic API key", ("T3BlbkFJ", "sk-ant-"),
     r"\b(sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}T3BlbkFJ[A-Za-z0-9_-]{20,}"
     r"|sk-ant-(?:api|admin)\d\d-[A-Za-z0-9_-]{80,})"),
    ("a Stripe key", ("sk_live_", "rk_live_"), r"\b((?:sk|rk)_live_[A-Za-z0-9]{20,})"),
)]
URL_PASSWORD = re.compile(r"://[^\s:/@'\"]+:([^\s/@'\"]+)@[^\s/'\"]")

# Lower-case words that make a name secret-like: `db_password`, `WANDB_API_KEY`, `"token"`.
SECRET_WORDS = ("password", "passwd", "passphrase", "pwd", "secret", "token", "api_key",
                "api-key", "apikey", "access_key", "access-key", "accesskey", "auth_key",
                "private_key", "credential")
NAME_CHARS = re.compile(r"[\w.-]")
# From the end of the secret-like word: the rest of the name, an optional closing quote and
# type annotation (`token: str = "..."`), the assignment, and a quoted or bare value.
ASSIGNMENT = re.compile(
    r"(?P<rest>[\w.-]*)[\"']?\]?(?:\s*:\s*[A-Za-z_][\w\[\]., |]{0,40}?)?\s*(?::=|=>|=|:)[ \t]*"
    r"(?:\"(?P<dq>[^\"\n]{1,200})\"|'(?P<sq>[^'\n]{1,200})'|(?P<bare>[^\s\"'`,;#]+))")
AWS_SECRET_NAME = re.compile(r"aws_?secret|secret_?access_?key")
AWS_SECRET_VALUE = re.compile(r"[A-Za-z0-9/+]{40}")
# Files in a programming language: a secret there is a quoted literal; anything unquoted is an
# expression (`password = os.environ[...]`, `token = self.token`).
CODE_SUFFIXES = (".py", ".pyi", ".pyx", ".js", ".mjs", ".cjs", ".ts", ".tsx", ".jsx", ".java",
                 ".kt", ".scala", ".go", ".rs", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".rb",
                 ".php", ".swift", ".r", ".jl", ".m", ".lua", ".pl")
PLACEHOLDER_WORDS = ("changeme", "change_me", "change-me", "example", "placeholder", "your",
                     "xxx", "***", "...", "dummy", "fake", "redacted", "replace", "todo",
                     "secret", "password", "passwd", "token", "none", "null", "true", "false")
# References and templates (`${VAR}`, `{{ var }}`, `<your-token>`, `f(x)`), and escapes
# (`"line\n"`: text, not a token).
PLACEHOLDER_MARKS = ("<", ">", "{", "}", "$", "%(", "(", "[", "\\")
ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*")  # `API_KEY = "NF1PROV_API_KEY"`: a variable's name
DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")  # `token = args.token`
MIN_SECRET_LENGTH = 8
MIN_ENTROPY = 3.0  # bits per character of a literal value: random tokens have 4 to 6
MIN_SHAPE_ENTROPY = 2.5  # `ghp_xxxx...`: a shape filled with a placeholder


def entropy(value: str) -> float:
    """Shannon entropy of ``value``'s characters, in bits per character."""
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def looks_random(value: str) -> bool:
    """A literal that reads like a generated secret, not a placeholder, a name or a path."""
    lower = value.lower()
    return (len(value) >= MIN_SECRET_LENGTH and not value.isdigit()
            and not any(word in lower for word in PLACEHOLDER_WORDS)
            and not any(mark in value for mark in PLACEHOLDER_MARKS)
            and not value.startswith(("/", "./", "../", "~")) and "://" not in value
            and not ENV_NAME.fullmatch(value) and not DOTTED_NAME.fullmatch(value)
            and entropy(value) >= MIN_ENTROPY)


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def private_keys(text: str):
    """(offset, key material) of each private key block: the BEGIN line on a line of its own
    (a key file), or anywhere followed by key material (a key in a JSON or Python string)."""
    if "-----BEGIN " not in text:
        return
    for match in PRIVATE_KEY_MARKER.finditer(text):
        body = KEY_BODY.match(text, match.end())
        end = KEY_END.search(text, match.end(), match.end() + BLOCK_REACH)
        line_start = text.rfind("\n", 0, match.start()) + 1
        line_end = text.find("\n", match.end())
        alone = text[line_start:line_end if line_end >= 0 else len(text)].strip() == match[0]
        if body:
            yield match.start(), body[1]
        elif end or alone:  # a whole block, however short its body; or a key file's first line
            yield match.start(), text[match.start():end.end() if end else match.end()]


def token_shapes(text: str):
    """(offset, kind, secret) of the well-known token shapes in ``text``."""
    for kind, prefixes, pattern in TOKEN_SHAPES:
        for prefix in prefixes:  # a plain loop: most files hold none, and it is the cost
            if prefix in text:
                break
        else:
            continue
        for match in pattern.finditer(text):
            if entropy(match[1]) >= MIN_SHAPE_ENTROPY:
                yield match.start(1), kind, match[1]


def assignments(text: str, code: bool):
    """(offset, kind, secret) of literal values assigned to secret-like names (in ``code``, only
    quoted literals count)."""
    lowered = text.lower()
    if len(lowered) != len(text):  # a few non-ASCII letters change length when lowered
        lowered = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    names = set()
    # a 40-character secret in a text that mentions AWS (or its SDK, boto) is AWS's
    aws = "aws" in lowered or "boto" in lowered or "AKIA" in text
    for word in SECRET_WORDS:
        at = lowered.find(word)
        while at >= 0:
            start = at
            while start and NAME_CHARS.match(text, start - 1):
                start -= 1
            match = ASSIGNMENT.match(text, at + len(word))
            if match and start not in names:  # `secret_token`: one name, two words
                names.add(start)
                yield from judge_assignment(text[start:match.end("rest")], match, code, start,
                                            aws)
            at = lowered.find(word, at + len(word))


def judge_assignment(key: str, match: re.Match, code: bool, offset: int, aws: bool):
    """The finding, if any, of the value ``match`` assigns to the name ``key`` (``aws``: the
    text mentions AWS)."""
    value = match["dq"] or match["sq"] or (None if code else match["bare"])
    if not value:
        return
    aws_name = AWS_SECRET_NAME.search(key.lower()) or (aws and "secret" in key.lower())
    if aws_name and AWS_SECRET_VALUE.fullmatch(value):
        if entropy(value) >= MIN_SHAPE_ENTROPY:
            yield offset, "an AWS secret access key", value
    elif looks_random(value):
        yield offset, f"a literal value assigned to '{key}'", value


def raw_findings(text: str, code: bool):
    """(offset, kind, secret) of every content rule's hits in ``text``, the most specific
    rules first."""
    for offset, secret in private_keys(text):
        yield offset, "a private key", secret
    yield from token_shapes(text)
    if "://" in text:
        for match in URL_PASSWORD.finditer(text):
            if looks_random(match[1]):
                yield match.start(1), "a password in a URL", match[1]
    yield from assignments(text, code)


def scan_text(text: str, path: str) -> list[Finding]:
    """Content findings in ``text`` (the file ``path``), one per line, in line order; the most
    specific rule names a line's secret."""
    code = PurePosixPath(path).suffix.lower() in CODE_SUFFIXES
    by_line: dict[int, Finding] = {}
    for offset, kind, secret in raw_findings(text, code):
        line = text.count("\n", 0, offset) + 1
        by_line.setdefault(line, Finding(path, line, kind, fingerprint(secret)))
    return [by_line[line] for line in sorted(by_line)]


# --- files ------------------------------------------------------------------------------------


def read_text(path: Path) -> str | None:
    """The first SCAN_BYTES of a regular text file, or None (a link, binary, unreadable)."""
    try:
        if path.is_symlink() or not path.is_file():
            return None  # git commits a link's target name, not what it points at
        with path.open("rb") as handle:
            data = handle.read(SCAN_BYTES)
    except OSError:
        return None
    if b"\0" in data[:BINARY_PROBE]:
        return None
    return data.decode("utf-8", errors="replace")


def scan_file(root: Path, rel: str, committed: bytes | None = None) -> list[Finding]:
    """Findings in the work tree's ``rel``; with ``committed`` (its HEAD version), only on lines
    HEAD does not already hold."""
    text = read_text(root / rel)
    if text is None:
        return []
    found = scan_text(text, rel)
    if committed is None or not found:
        return found
    old = set(committed.decode("utf-8", errors="replace").replace("\r\n", "\n").split("\n"))
    lines = text.replace("\r\n", "\n").split("\n")
    return [f for f in found if lines[f.line - 1] not in old]


def find_secrets(root: Path, new: list[str], changed: list[str]) -> list[Finding]:
    """What looks like a secret among the files a model commit would take: ``new`` files (by
    name and content) and the tracked files it would change, ``changed`` (by their lines not in
    HEAD), less what the allow-list allows."""
    root = Path(root)
    found = []
    for rel in new:
        reason = secret_name_reason(rel)
        found += [Finding(rel, 0, reason)] if reason else scan_file(root, rel)
    committed = git.head_blobs(root, changed) if changed else {}
    for rel in changed:
        found += scan_file(root, rel, committed.get(rel, b""))
    if not found:
        return []
    allowances = read_allow_list(root)
    return [f for f in found if not any(a.allows(f) for a in allowances)]


# --- the allow-list ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Allowance:
    """One line of the allow-list: a path (or glob), optionally one line or one fingerprint."""
    pattern: str
    line: int | None = None
    fingerprint: str | None = None

    def allows(self, finding: Finding) -> bool:
        return (fnmatch.fnmatchcase(finding.path, self.pattern)
                and self.line in (None, finding.line)
                and (self.fingerprint is None or finding.fingerprint == self.fingerprint))


ALLOW_LINE = re.compile(r"(?P<path>[^\s:]+)(?::(?P<line>\d+))?(?:\s+(?P<fp>[0-9a-f]{12}))?")


def read_allow_list(root: Path) -> list[Allowance]:
    """The allowances of ``ALLOW_FILE`` (none without the file); a malformed line, or an
    allow-list git ignores (it would never be reviewed), is a UserError naming it."""
    path = Path(root) / ALLOW_FILE
    if not path.is_file():
        return []
    if git.is_ignored(root, path):
        raise UserError(f"{path} is git-ignored, so it would never be committed and reviewed: "
                        "remove its ignore rule (the allow-list is code, not a local setting).")
    allowances = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        entry = re.split(r"(?:^|\s)#", raw, maxsplit=1)[0].strip()
        if not entry:
            continue
        match = ALLOW_LINE.fullmatch(entry)
        if not match:
            raise UserError(
                f"{ALLOW_FILE}:{number}: {raw.strip()!r} is not an allow-list entry. Write one "
                "per line: 'PATH  # why' (the whole file; PATH may be a glob), 'PATH:LINE  # "
                "why' or 'PATH FINGERPRINT  # why' (the 12 hex digits the refusal printed).")
        allowances.append(Allowance(match["path"], int(match["line"]) if match["line"] else None,
                                    match["fp"]))
    return allowances


def refusal_message(root: Path, found: list[Finding], staged: set[str]) -> str:
    """The UserError text for ``found``: each file, line and kind (never the secret), and how
    to keep a secret out or allow a false positive."""
    lines = "".join(f"\n  {f.describe()}" for f in found[:20])
    more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
    unstage_text = unstage_advice([f.path for f in found], staged)
    return (f"The model commit would include files that look like secrets or hold one:"
            f"{lines}{more}\nNothing "
            "was created. Keep a real secret out of git: read it from an environment variable "
            f"or a git-ignored file, or add the file (or its folder) to {root / '.gitignore'}."
            f"{unstage_text} If one is a false positive, allow it in {ALLOW_FILE} at the "
            "repository root (committed and reviewed like code), one line each: 'PATH  # why' "
            "(the whole file), 'PATH:LINE  # why' or 'PATH FINGERPRINT  # why' (that value "
            "wherever it moves in the file).")
