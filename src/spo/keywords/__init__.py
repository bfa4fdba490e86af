"""Key-phrase extractors: rake (default), yake, positionrank and the random-span control.

>>> from spo.keywords import extract
>>> [kp.phrase for kp in extract("Red apples are good in flavour.")]
['red apples', 'good', 'flavour']

``extract`` builds (and caches) an extractor per distinct option set; code that runs many texts
should build one with ``get_extractor`` and call its ``.extract(text)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from spo.keywords.base import Extractor, KeyPhrase, load_stopwords
from spo.keywords.positionrank import PositionRankExtractor
from spo.keywords.rake import RakeExtractor
from spo.keywords.random_spans import RandomSpanExtractor
from spo.keywords.yake_method import YakeExtractor

METHODS: dict[str, type[Extractor]] = {
    "rake": RakeExtractor,
    "yake": YakeExtractor,
    "positionrank": PositionRankExtractor,
    "random": RandomSpanExtractor,
}

__all__ = ["METHODS", "Extractor", "KeyPhrase", "extract", "get_extractor", "load_stopwords", "method_options"]


def get_extractor(
    method: str = "rake",
    *,
    stopwords: Any = "english",
    max_phrases: int | None = None,
    seed: int = 0,
    **options: Any,
) -> Extractor:
    """A reusable extractor: ``get_extractor("rake").extract(text) -> list[KeyPhrase]``.

    ``options`` are the fields of the method's option class in spo.config (RakeOptions,
    YakeOptions, PositionRankOptions, RandomOptions; ``random`` also takes ``rake=`` a
    RakeOptions or dict for its reference RAKE); unknown ones raise a ValueError.  ``seed`` is
    used only by ``random``; the other methods are deterministic and ignore it.
    """
    cls = METHODS.get(method)
    if cls is None:
        raise ValueError(f"unknown key-phrase method {method!r}; choose one of: {', '.join(METHODS)}")
    if method == "random":  # the one method that takes a seed
        return RandomSpanExtractor(stopwords=stopwords, max_phrases=max_phrases, seed=seed, **options)
    return cls(stopwords=stopwords, max_phrases=max_phrases, **options)


def method_options(keywords_cfg: Any) -> dict[str, Any]:
    """get_extractor keyword arguments for a KeywordsConfig section (minus the method)."""
    method = keywords_cfg.method
    options: dict[str, Any] = {
        "stopwords": keywords_cfg.stopwords,
        "max_phrases": keywords_cfg.max_phrases,
        **getattr(keywords_cfg, method).model_dump(),
    }
    if method == "random":
        options["rake"] = keywords_cfg.rake.model_dump()
    return options


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        return value
    if isinstance(value, Iterable):
        return frozenset(value)
    return value


_CACHE: dict[Any, Extractor] = {}
_CACHE_SIZE = 32


def extract(text: str, method: str = "rake", **options: Any) -> list[KeyPhrase]:
    """Ranked key phrases of ``text``, best first (see get_extractor for ``options``)."""
    try:
        key = (method, _freeze(options))
        hash(key)
    except TypeError:
        key = None
    extractor = _CACHE.get(key) if key is not None else None
    if extractor is None:
        extractor = get_extractor(method, **options)
        if key is not None:
            if len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = extractor
    return extractor.extract(text)
