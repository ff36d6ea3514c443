"""A readers-writer lock: many searches at once, or one catalog write alone.

Writers take precedence: once a write waits, new readers queue behind it, so a steady stream of
searches cannot starve an add or a reload's swap.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class ReadersWriterLock:
    """`with lock.read():` for searches (shared), `with lock.write():` for add/remove/save/swap (exclusive).

    Example:
        >>> lock = ReadersWriterLock()
        >>> with lock.read():
        ...     pass
        >>> with lock.write():
        ...     pass
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._condition:
            while self._writing or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if self._readers == 0:
                    self._condition.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._condition.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()
