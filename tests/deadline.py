"""A deadline for calls that could block (a FIFO, /dev/zero): a hang fails the test instead of freezing the suite."""

import threading


def within(seconds, function, *args):
    """function(*args) in a daemon thread; its result, or its exception re-raised here; fails past `seconds`."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    name = getattr(function, "__name__", function)
    assert not thread.is_alive(), f"{name}{args} blocked for more than {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
