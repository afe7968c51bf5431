"""Third-party output a user cannot act on, kept out of the product's own (set up once at start).

- megatron-core warns at import, once per module and per process, that Transformer Engine and
  Apex are not installed (it falls back to torch kernels, which is what runs here on purpose);
- torch.distributed's deprecation FutureWarnings come from DeepSpeed's own calls;
- DeepSpeed prints "... built successfully" when it loads its CPU communication op, and its
  zero_to_fp32 prints progress while the checkpoint readers gather ZeRO shards.

Warnings are filtered by message and module only, so every other warning still shows. Captured
prints go to the `pretrain.thirdparty` logger at DEBUG, and are re-emitted at WARNING if the call
fails, so nothing that explains an error is lost.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

log = logging.getLogger("pretrain.thirdparty")

_FILTERS = (
    # (category, message regex, module regex)
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\."),
    (FutureWarning, r"", r"torch\.distributed"),
)
_done = False


def filter_third_party_warnings() -> None:
    """Install the filters (idempotent). Call before megatron-core or DeepSpeed is imported."""
    global _done
    if _done:
        return
    for category, message, module in _FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    _done = True


@contextlib.contextmanager
def captured_output(what: str):
    """Run a third-party call with its stdout/stderr prints captured into the log (DEBUG)."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    except BaseException:
        text = buf.getvalue().strip()
        if text:
            log.warning("%s printed before failing:\n%s", what, text)
        raise
    text = buf.getvalue().strip()
    if text:
        log.debug("%s: %s", what, text)
