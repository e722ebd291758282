"""Schemathesis hooks for ./scripts/fuzz.sh (loaded through SCHEMATHESIS_HOOKS).

- A fresh `Idempotency-Key` for every request that carries a valid one, as a client must send:
  generated keys repeat (short strings, examples, boundary values), and the same key with
  another request is a 422 by design (tests/test_idempotency.py), which the "valid data
  accepted" check would count as a refusal. Invalid keys are left as generated: they must
  still get their 400.
- A coverage case meant to lack `Authorization` really lacks it: the token given with
  `--header` is otherwise added back, and the case judged on an answer to an authenticated
  request (a 412 for its generated `If-Match`, say, instead of the 401 it expects).
"""

import re
import uuid
from typing import Any

import schemathesis

_VALID_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@schemathesis.hook
def before_call(_context: Any, case: Any, _kwargs: dict[str, Any]) -> None:
    headers = case.headers
    if not headers:
        return
    key = headers.get("Idempotency-Key")
    if isinstance(key, str) and _VALID_KEY.fullmatch(key):
        headers["Idempotency-Key"] = str(uuid.uuid4())
    data = getattr(getattr(case.meta, "phase", None), "data", None)
    missing = getattr(data, "scenario", None) == "missing_parameter"
    if missing and str(getattr(data, "parameter", "")).lower() == "authorization":
        headers.pop("Authorization", None)
