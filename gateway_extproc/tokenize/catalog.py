"""TokenizerCatalog: which tokenizer directory serves which model, loaded once and shared.

A model's directory comes from the models file (`tokenizer: PATH` on the model) or, for
Kubernetes, from `--tokenizers-dir DIR` as `DIR/<model name>/` (a name like
`meta-llama/Llama-3.1-8B` is a path below DIR; names that would leave DIR are refused).
Loading is blocking and happens in the caller's thread (the request side calls it from
its worker thread); each tokenizer is loaded once, by one thread, and kept. A directory
that fails to load is logged once and tried again after `retry_after` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

import structlog

from gateway_extproc.tokenize.tokenizer import ModelTokenizer, TokenizerLoadError

log = structlog.get_logger("gateway_extproc.tokenize")


class TokenizerCatalog:
    def __init__(
        self,
        directories: Mapping[str, str] | None = None,
        *,
        root: str = "",
        retry_after: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Read live: the registry updates it when the models file changes.
        self._directories: Mapping[str, str] = directories if directories is not None else {}
        self._root = Path(root) if root else None
        self._retry_after = retry_after
        self._clock = clock
        self._loaded: dict[Path, ModelTokenizer] = {}
        self._failed: dict[Path, float] = {}  # directory -> when loading last failed
        self._lock = threading.Lock()

    def directory_for(self, model: str) -> Path | None:
        explicit = self._directories.get(model)
        if explicit:
            return Path(explicit)
        if self._root is None or not _safe_relative(model):
            return None
        candidate = self._root / model
        return candidate if (candidate / "tokenizer.json").is_file() else None

    def configured(self) -> bool:
        """Some model can have a tokenizer (so precise prefix routing is worth setting up)."""
        return bool(self._directories) or self._root is not None

    def loaded(self, model: str) -> bool:
        """The model's tokenizer is in memory (so using it does not block on loading)."""
        directory = self.directory_for(model)
        return directory is not None and directory in self._loaded

    def if_loaded(self, model: str) -> ModelTokenizer | None:
        """The model's tokenizer if it is in memory; never loads (safe on the event loop)."""
        directory = self.directory_for(model)
        return self._loaded.get(directory) if directory is not None else None

    def get(self, model: str) -> ModelTokenizer | None:
        """The model's tokenizer, loading it if needed (blocking); None when it has none or
        its directory does not load."""
        directory = self.directory_for(model)
        if directory is None:
            return None
        found = self._loaded.get(directory)
        if found is not None:
            return found
        with self._lock:  # one thread loads a directory; the others wait for it
            found = self._loaded.get(directory)
            if found is not None:
                return found
            failed_at = self._failed.get(directory)
            if failed_at is not None and self._clock() - failed_at < self._retry_after:
                return None
            try:
                tokenizer = ModelTokenizer.load(directory)
            except TokenizerLoadError as exc:
                self._failed[directory] = self._clock()
                log.warning(
                    "tokenizer_not_loaded",
                    model=model,
                    directory=str(directory),
                    problem=str(exc),
                    fallback="approximate prefix routing for this model",
                )
                return None
            self._failed.pop(directory, None)
            self._loaded[directory] = tokenizer
            log.info(
                "tokenizer_loaded",
                model=model,
                directory=str(directory),
                chat_template=tokenizer.chat_template is not None,
                piecewise=tokenizer.piecewise,
            )
            return tokenizer


def _safe_relative(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name
