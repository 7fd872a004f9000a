"""The one rule for what counts as a secret: used for W&B configs and command lines
(:mod:`ickd.track.wandb_logger`) and for storage URLs (:mod:`ickd.sweep.storage`). Dependency-free.

A broad deny-list, erring towards hiding too much (a harmless ``num_tokens`` is hidden too):

- **key names**: split into words (``_ - . /`` and camelCase), a key is secret if a word is one of
  pass, pwd, pw, passwd, password, passphrase, passcode, secret(s), token(s), credential(s), creds,
  auth, authorization, authentication, private, privkey, cookie, session(id), signature, or the
  words contain ``api key`` / ``access key`` / ``private key`` / ``client secret``, or one word
  *contains* password/passwd/passphrase/secret/token/credential/apikey/accesskey/privatekey/authtoken
  (``hf_token``, ``dbPassword``, ``WANDB_API_KEY``). Words are matched whole, so ``author``,
  ``authors`` and ``tokenizer`` are kept.
- **userinfo in any URL** (``scheme://userinfo@host``): ``user:password@`` keeps the user and hides
  the password; a lone userinfo (``https://TOKEN@host``) is hidden entirely, except for database
  schemes (postgresql, mysql, ...), where a lone userinfo is the user name.
- **query parameters** whose name contains pass, pwd, secret, token, key, auth, credential, sig
  (``?sslpassword=``, ``?api_key=``, ``?X-Amz-Signature=``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

_SECRET_WORDS = frozenset({
    "pass", "pwd", "pw", "passwd", "password", "passwords", "passphrase", "passcode", "secret", "secrets",
    "token", "tokens", "credential", "credentials", "creds", "cred", "auth", "authorization",
    "authentication", "private", "privkey", "cookie", "cookies", "session", "sessionid", "signature",
})
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("client", "secret"), ("secret", "key")})
_SECRET_PARTS = ("password", "passwd", "passphrase", "secret", "token", "credential", "apikey", "accesskey", "privatekey", "authtoken")
# Words that contain a secret part but are not secrets.
_NOT_SECRET = frozenset({"tokenizer", "tokenizers", "tokenize", "tokenized", "tokenization"})

_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


def _words(name: str) -> list[str]:
    return [w.lower() for w in _WORD_SPLIT.split(str(name)) if w]


def is_secret_key(name: Any) -> bool:
    """True if a config key / override key / environment variable name looks like it holds a secret."""
    words = _words(str(name))
    if any(w in _SECRET_WORDS for w in words):
        return True
    if any(pair in _SECRET_PAIRS for pair in zip(words, words[1:])):
        return True
    return any(part in w for w in words if w not in _NOT_SECRET for part in _SECRET_PARTS)


# Query parameter names that hold secrets: substring match (sslpassword, access_token, apiKey, sig).
_SECRET_QUERY_NAME = re.compile(r"pass|pwd|secret|token|key|auth|credential|sig", re.IGNORECASE)
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[^=&;#\s?]+)=)(?P<value>[^&;#\s]*)")
# scheme://userinfo@ - the userinfo runs to the last "@" before the path (passwords may hold a raw "@").
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<userinfo>[^/\s?#]*)@")
# Schemes where a userinfo without ":" is a user name, not a token.
_DB_SCHEMES = ("postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle", "cockroachdb", "sqlite", "redis", "mongodb")


def is_secret_query_name(name: str) -> bool:
    return bool(_SECRET_QUERY_NAME.search(name))


def _redact_userinfo(m: re.Match) -> str:
    scheme, userinfo = m["scheme"], m["userinfo"]
    if ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        return f"{scheme}://{user}:{REDACTED}@"
    if scheme.lower().split("+", 1)[0] in _DB_SCHEMES:
        return m.group(0)
    return f"{scheme}://{REDACTED}@"


def redact_text(value: str) -> str:
    """A string with URL userinfo secrets and secret query parameters hidden."""
    value = _URL_USERINFO.sub(_redact_userinfo, value)
    return _QUERY_PARAM.sub(
        lambda m: f"{m['head']}{REDACTED}" if is_secret_query_name(m["name"]) and m["value"] else m.group(0), value
    )


def redact_value(value: Any) -> Any:
    """Strings with secrets inside URLs hidden; other values unchanged."""
    return redact_text(value) if isinstance(value, str) else value


def redact(data: Any) -> Any:
    """A copy of ``data`` (nested mappings/lists) safe to log or upload: values under secret-looking
    keys become ``***`` (whatever their type), secrets inside URLs are hidden."""
    if isinstance(data, Mapping):
        return {k: (REDACTED if is_secret_key(k) and data[k] not in (None, "") else redact(data[k])) for k in data}
    if isinstance(data, (list, tuple)):
        return [redact(v) for v in data]
    return redact_value(data)


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line arguments with secrets hidden: ``+db.pwd=x`` -> ``+db.pwd=***``,
    ``--token=x`` -> ``--token=***``, ``--token x`` -> ``--token ***``, URLs as in :func:`redact_text`."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        key, sep, value = arg.partition("=")
        if sep and value and is_secret_key(key.lstrip("+~-")):
            out.append(f"{key}={REDACTED}")
        else:
            out.append(redact_text(arg))
            hide_next = not sep and arg.startswith("--") and is_secret_key(arg.lstrip("-"))
    return out


def url_password_in(url: str) -> bool:
    """True if ``url`` carries a password in its userinfo."""
    m = _URL_USERINFO.search(url)
    return bool(m and ":" in m["userinfo"])


def scrub_overrides(overrides: list[str], text: str) -> tuple[list[str], str]:
    """Overrides and an error text about them with every secret value hidden (a parser's error echoes
    the bad override, secret and all)."""
    shown = redact_argv(overrides)
    for raw, safe in zip(overrides, shown):
        if raw != safe:
            secret = raw.split("=", 1)[1] if "=" in raw else raw
            if secret:
                text = text.replace(secret, REDACTED)
    return shown, text
