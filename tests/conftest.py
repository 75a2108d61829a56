import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _quiet():
    from leaklab._quiet import quiet

    quiet()


@pytest.fixture(autouse=True)
def _signal_dispositions_are_restored(request):
    """Some libraries a test drives (Flower's simulation, Ray) install their own SIGINT/SIGTERM handlers, or leave
    SIGINT ignored, and do not put the old ones back; a later test's child process would inherit an ignored SIGINT
    (the Ctrl-C test then hangs). Put them back after every test and say which test changed them."""
    import signal
    import warnings

    names = ("SIGINT", "SIGTERM")
    before = {n: signal.getsignal(getattr(signal, n)) for n in names}
    yield
    for n in names:
        now = signal.getsignal(getattr(signal, n))
        if now is not before[n]:
            signal.signal(getattr(signal, n), before[n])
            warnings.warn(f"{request.node.nodeid} left {n} as {now!r}; restored", stacklevel=1)
