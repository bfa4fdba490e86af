"""The Great Expectations suite that guards prepared preference rows.

One suite, built from the ``validate`` params, is run once over the rows of all splits
together (a ``split`` column tells them apart); split- or source-specific expectations use a
GX ``row_condition`` instead of separate batches, so a whole data set costs one validation.

Every expectation is run with ``result_format="COMPLETE"`` and
``unexpected_index_column_names=["row_index"]`` (the row's position in the input, unique even
when ids are not), so the stage learns exactly which rows failed which check and can put each
bad row in the quarantine with all its reasons.

Checks and the GX expectation behind each (``Check.name`` in brackets):

* required fields present: ``ExpectColumnToExist`` [``exists:<field>``], non-null:
  ``ExpectColumnValuesToNotBeNull`` [``not_null:<field>``], strings:
  ``ExpectColumnValuesToBeOfType(type_="str")`` [``is_str:<field>``];
  ``split``/``source`` known: ``ExpectColumnValuesToBeInSet``.
* non-blank responses: a derived column ``<response>_stripped_chars`` (length after
  ``str.strip()``) with ``ExpectColumnValuesToBeBetween(min_value=min_response_chars)``
  [``not_blank:<response>``].
* length bounds: ``ExpectColumnValueLengthsToBeBetween`` on ``prompt`` (min and max prompt
  chars) and on ``chosen``/``rejected`` (max response chars; their minimum is the stripped
  check above, so an empty response gets one reason, not two) [``length:<field>``].
* ``chosen != rejected``: ``ExpectSelectColumnValuesToBeUniqueWithinRecord`` [``distinct_responses``].
* valid UTF-8: ``ExpectColumnValuesToNotMatchRegex`` with the class ``[\\ud800-\\udfff]``:
  invalid bytes were read with ``errors="surrogateescape"`` and so are lone surrogates
  [``utf8:<field>``].
* unique ids over all splits: ``ExpectColumnValuesToBeUnique`` [``unique_id``]. GX flags every
  copy; the first copy (in train, eval, test order) is exempt, so only later copies fail.
* no prompt shared across splits: a derived ``prompt_key`` column (sha256 of the lower-cased,
  whitespace-normalised prompt) and ``ExpectColumnValuesToNotBeInSet`` with the earlier split's
  keys as value set (only those that occur in the later split at all, see ``build_checks``),
  restricted to the later split by ``row_condition``
  [``no_shared_prompt:train->eval``, ``train->test``, ``eval->test``].
* HH prompts end with ``"\\n\\nAssistant:"``: ``ExpectColumnValuesToMatchRegex`` on the
  ``source == "hh"`` rows [``hh_assistant_marker``].

Pandas 3 + pyarrow note: GX's regex metrics call ``column.astype(str)`` and GX fingerprints the
batch with ``pd.util.hash_pandas_object``; both fail on lone surrogates (pyarrow strings must
be valid UTF-8).  :func:`run_suite` therefore keeps text columns as ``object`` dtype (with
``future.infer_string`` off during the run) and skips GX's batch fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from spo.config import SPLITS, ValidateConfig

if TYPE_CHECKING:  # pragma: no cover
    from great_expectations.expectations import Expectation

REQUIRED_FIELDS = ("id", "source", "split", "prompt", "chosen", "rejected")
TEXT_FIELDS = ("prompt", "chosen", "rejected")
RESPONSE_FIELDS = ("chosen", "rejected")
SOURCES = ("hh", "tldr")
HH_ASSISTANT_MARKER = "\n\nAssistant:"
ROW_INDEX = "row_index"
PROMPT_KEY = "prompt_key"
# Written with \u escapes (Python's re understands them) so the suite serialises as plain ASCII.
SURROGATE_REGEX = r"[\ud800-\udfff]"
HH_MARKER_REGEX = re.escape(HH_ASSISTANT_MARKER) + r"\Z"
# (earlier split, later split): rows of the later split must not reuse a prompt of the earlier.
SHARED_PROMPT_PAIRS = (("train", "eval"), ("train", "test"), ("eval", "test"))
SUITE_NAME = "spo_prepared_rows"

_SURROGATE = re.compile(SURROGATE_REGEX)
Describe = Callable[[dict[str, Any]], str]


def stripped_column(name: str) -> str:
    return f"{name}_stripped_chars"


def prompt_key(prompt: Any) -> str | None:
    """Hash of the prompt with whitespace runs collapsed and case folded (None if not text)."""
    if not isinstance(prompt, str):
        return None
    normal = " ".join(prompt.split()).lower()
    return hashlib.sha256(normal.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def quoted(text: str, limit: int = 40) -> str:
    """A short, ASCII-safe quotation of data text for a reason (lone surrogates escaped)."""
    if len(text) > limit:
        text = "..." + text[-limit:]
    return json.dumps(text, ensure_ascii=True)


@dataclass
class Check:
    """One expectation in the suite, with what a user needs to read its failures."""

    name: str  # unique in the suite, used for metrics and to match GX results back
    title: str  # plain words for the report
    field: str  # the input field a failure is about
    needs: tuple[str, ...]  # input columns the expectation reads (incl. its row_condition)
    expectation: Expectation
    describe: Describe  # prepared row -> reason in plain words
    exempt: frozenset[int] = frozenset()  # row positions GX flags that are not failures

    @property
    def type(self) -> str:
        return self.expectation.expectation_type

    @property
    def column(self) -> str:
        kwargs = self.expectation.configuration.kwargs
        if "column" in kwargs:
            return kwargs["column"]
        return ",".join(kwargs.get("column_list", ()))

    @property
    def condition(self) -> str | None:
        cond = getattr(self.expectation, "row_condition", None)
        return None if cond is None else repr(cond)


@dataclass
class Outcome:
    """A check's result: the GX verdict and the input positions that fail it."""

    check: Check
    success: bool
    evaluated: bool
    unexpected_count: int  # as GX reports it (e.g. every copy of a duplicated id)
    element_count: int
    failed: list[int] = field(default_factory=list)  # after exemptions
    note: str | None = None


def build_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The columns the suite reads, nothing else (the big ``original`` dict stays out).

    A required field absent from every row stays absent, so ``ExpectColumnToExist`` can fail.
    Text columns are ``object`` dtype: a pyarrow string column cannot hold lone surrogates.
    """
    frame = pd.DataFrame(index=pd.RangeIndex(len(rows)))
    frame[ROW_INDEX] = pd.Series(range(len(rows)), dtype="int64")
    present = {key for row in rows for key in row}
    for name in REQUIRED_FIELDS:
        if name in present:
            frame[name] = pd.Series([row.get(name) for row in rows], dtype=object)
    for name in RESPONSE_FIELDS:
        if name in present:
            stripped = [len(v.strip()) if isinstance(v, str) else None for v in frame[name]]
            frame[stripped_column(name)] = pd.array(stripped, dtype="Int64")
    if "prompt" in present:
        frame[PROMPT_KEY] = pd.Series([prompt_key(v) for v in frame["prompt"]], dtype=object)
    return frame


def _first_positions(frame: pd.DataFrame) -> dict[Any, int]:
    """id -> position of its first copy."""
    first: dict[Any, int] = {}
    if "id" in frame:
        for pos, value in enumerate(frame["id"]):
            if value is None or value != value:  # None or NaN: not an id
                continue
            try:
                first.setdefault(value, pos)
            except TypeError:  # unhashable (a list or dict): is_str:id reports it
                continue
    return first


def build_checks(params: ValidateConfig, frame: pd.DataFrame, rows: Sequence[dict[str, Any]]) -> list[Check]:
    """The suite as a list of checks, configured from the ``validate`` params.

    ``frame`` supplies what some expectations need as parameters: the prompt keys of each
    split (value sets of the shared-prompt checks) and the first copy of each id.
    """
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    checks: list[Check] = []

    def add(name: str, title: str, fld: str, needs: tuple[str, ...], expectation_cls: Any,
            describe: Describe, exempt: frozenset[int] = frozenset(), **kwargs: Any) -> None:
        expectation = expectation_cls(meta={"check": name}, description=title, **kwargs)
        checks.append(Check(name, title, fld, needs, expectation, describe, exempt))

    # each describe function binds its field as a default (n=name): a closure would read the loop's last
    for name in REQUIRED_FIELDS:
        def absent(row: dict[str, Any], n: str = name) -> str:
            return f"column {n} is missing from every input row"

        add(f"exists:{name}", f"column {name} exists", name, (), gxe.ExpectColumnToExist, absent, column=name)
    for name in REQUIRED_FIELDS:
        def null(row: dict[str, Any], n: str = name) -> str:
            return f"{n} is missing from the row" if n not in row else f"{n} is null"

        add(f"not_null:{name}", f"{name} is present and not null", name, (name,),
            gxe.ExpectColumnValuesToNotBeNull, null, column=name)
    for name in REQUIRED_FIELDS:
        def not_str(row: dict[str, Any], n: str = name) -> str:
            return f"{n} is of type {type(row.get(n)).__name__}, not a string"

        add(f"is_str:{name}", f"{name} is a string", name, (name,), gxe.ExpectColumnValuesToBeOfType, not_str,
            column=name, type_="str")
    add("known:split", "split is train, eval or test", "split", ("split",), gxe.ExpectColumnValuesToBeInSet,
        lambda row: f"split {quoted(str(row.get('split')))} is not one of {', '.join(SPLITS)}",
        column="split", value_set=list(SPLITS))
    add("known:source", "source is hh or tldr", "source", ("source",), gxe.ExpectColumnValuesToBeInSet,
        lambda row: f"source {quoted(str(row.get('source')))} is not one of {', '.join(SOURCES)}",
        column="source", value_set=list(SOURCES))

    lo = params.min_response_chars
    for name in RESPONSE_FIELDS:
        def blank(row: dict[str, Any], n: str = name) -> str:
            kept = len(row[n].strip())
            if kept == 0:
                return f"{n} is empty or only whitespace"
            return f"{n} has {kept} characters after stripping whitespace < min {lo}"

        add(f"not_blank:{name}", f"{name} has at least {lo} characters after stripping whitespace", name, (name,),
            gxe.ExpectColumnValuesToBeBetween, blank, column=stripped_column(name), min_value=lo)

    bounds = {
        "prompt": (params.min_prompt_chars, params.max_prompt_chars),
        "chosen": (None, params.max_response_chars),
        "rejected": (None, params.max_response_chars),
    }
    for name, (low, high) in bounds.items():
        def length(row: dict[str, Any], n: str = name, low: int | None = low, high: int = high) -> str:
            size = len(row[n])
            if low is not None and size < low:
                return f"{n} length {size} < min {low}"
            return f"{n} length {size} > max {high}"

        span = f"{low}..{high}" if low is not None else f"at most {high}"
        add(f"length:{name}", f"{name} length {span} characters", name, (name,),
            gxe.ExpectColumnValueLengthsToBeBetween, length, column=name, min_value=low, max_value=high)

    add("distinct_responses", "chosen differs from rejected", "chosen", ("chosen", "rejected"),
        gxe.ExpectSelectColumnValuesToBeUniqueWithinRecord,
        lambda row: "chosen and rejected are identical", column_list=["chosen", "rejected"])

    for name in TEXT_FIELDS:
        def utf8(row: dict[str, Any], n: str = name) -> str:
            text = row[n]
            bad = _SURROGATE.findall(text)
            pos = _SURROGATE.search(text).start()  # type: ignore[union-attr]
            code = ord(bad[0])
            if 0xDC80 <= code <= 0xDCFF:
                what = f"invalid byte 0x{code - 0xDC00:02x} at character {pos}"
            else:
                what = f"lone surrogate U+{code:04X} at character {pos}"
            more = f" ({len(bad)} in all)" if len(bad) > 1 else ""
            return f"{n} is not valid UTF-8: {what}{more}"

        add(f"utf8:{name}", f"{name} is valid UTF-8 (no lone surrogates)", name, (name,),
            gxe.ExpectColumnValuesToNotMatchRegex, utf8, column=name, regex=SURROGATE_REGEX)

    first = _first_positions(frame)

    def duplicate(row: dict[str, Any]) -> str:
        if row["id"] not in first:  # pragma: no cover - GX flagged a value we could not index
            return f"duplicate id {quoted(str(row['id']))}"
        kept = rows[first[row["id"]]]
        return (f"duplicate id {row['id']}: the first copy ({kept.get('split')}, {kept.get('origin')} "
                f"line {kept.get('line')}, id {kept.get('id')}) is kept, this later copy is quarantined")

    add("unique_id", "id is unique across all splits (first copy kept)", "id", ("id",),
        gxe.ExpectColumnValuesToBeUnique, duplicate, exempt=frozenset(first.values()), column="id")

    owners: dict[str, dict[str, str]] = {split: {} for split in SPLITS}
    if {"split", PROMPT_KEY}.issubset(frame.columns):
        for split, key, row in zip(frame["split"], frame[PROMPT_KEY], rows):
            if split in owners and key is not None:
                owners[split].setdefault(key, str(row.get("id")))
    for early, late in SHARED_PROMPT_PAIRS:
        # The value set is the earlier split's keys that also occur in the later split: the
        # others can never match, so the unexpected rows are the same as with every key, but
        # GX deep-copies each expectation's config hundreds of times during a run and a value
        # set of thousands of keys would make validation several seconds slower.
        overlap = sorted(owners[early].keys() & owners[late].keys())
        def shared(row: dict[str, Any], early: str = early, late: str = late) -> str:
            other = owners[early].get(prompt_key(row["prompt"]) or "", "?")
            return f"prompt also occurs in {early} (id {other}); {late} rows must not share a prompt with {early}"

        add(f"no_shared_prompt:{early}->{late}", f"{late} prompts do not occur in {early}", "prompt",
            ("prompt", "split"), gxe.ExpectColumnValuesToNotBeInSet, shared,
            column=PROMPT_KEY, value_set=overlap, row_condition=Column("split") == late)

    add("hh_assistant_marker", "HH prompts end with the assistant marker", "prompt", ("prompt", "source"),
        gxe.ExpectColumnValuesToMatchRegex,
        lambda row: (f"HH prompt does not end with the assistant marker {quoted(HH_ASSISTANT_MARKER)} "
                     f"(it ends with {quoted(str(row['prompt']), 30)})"),
        column="prompt", regex=HH_MARKER_REGEX, row_condition=Column("source") == "hh")
    return checks


@contextlib.contextmanager
def _surrogate_safe_pandas() -> Iterator[None]:
    """Let GX's pandas code handle strings with lone surrogates (see the module docstring)."""
    from great_expectations.execution_engine import pandas_execution_engine as engine

    threshold = getattr(engine, "HASH_THRESHOLD", None)
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        try:
            stack.enter_context(pd.option_context("future.infer_string", False))
        except (KeyError, pd.errors.OptionError):  # pragma: no cover - option removed (pandas 4)
            pass
        if threshold is not None:
            engine.HASH_THRESHOLD = 0  # the batch fingerprint hashes every string as UTF-8
        try:
            yield
        finally:
            if threshold is not None:
                engine.HASH_THRESHOLD = threshold


def _raised(exception_info: Any) -> str | None:
    """The exception message of a GX result, whichever of its two shapes it has."""
    if not isinstance(exception_info, dict):
        return None
    if exception_info.get("raised_exception"):
        return str(exception_info.get("exception_message"))
    for value in exception_info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def run_suite(frame: pd.DataFrame, checks: list[Check]) -> list[Outcome]:
    """Validate ``frame`` with one suite run on an ephemeral context; one outcome per check."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch_definition = (
        context.data_sources.add_pandas("spo")
        .add_dataframe_asset("prepared_rows")
        .add_batch_definition_whole_dataframe("all_splits")
    )
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for check in checks:
        suite.add_expectation(check.expectation)
    result_format = {
        "result_format": "COMPLETE",
        "unexpected_index_column_names": [ROW_INDEX],
        "return_unexpected_index_query": False,
    }
    with _surrogate_safe_pandas():
        batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(suite, result_format=result_format)

    by_name = {check.name: check for check in checks}
    outcomes: dict[str, Outcome] = {}
    all_rows = list(range(len(frame)))
    for item in result.results:
        if item.expectation_config is None:  # GX attaches it to every result of a suite run
            raise RuntimeError(f"great_expectations returned a result without its expectation: {item}")
        check = by_name[item.expectation_config.meta["check"]]
        error = _raised(item.exception_info)
        if error is not None:
            missing = [c for c in check.needs if c not in frame.columns]
            if not missing:
                raise RuntimeError(f"expectation {check.name} ({check.type}) could not be evaluated: {error}")
            outcomes[check.name] = Outcome(
                check, success=False, evaluated=False, unexpected_count=0, element_count=0,
                note=f"not evaluated: column {', '.join(missing)} missing",
            )
            continue
        res = item.result or {}
        if check.type == "expect_column_to_exist":
            failed = [] if item.success else all_rows
            unexpected = 0 if item.success else len(frame)
        else:
            positions = sorted({int(entry[ROW_INDEX]) for entry in res.get("unexpected_index_list") or []})
            failed = [p for p in positions if p not in check.exempt]
            unexpected = int(res.get("unexpected_count") or 0)
            if unexpected != len(positions):
                raise RuntimeError(
                    f"expectation {check.name}: GX counted {unexpected} unexpected rows but listed {len(positions)}"
                )
        outcomes[check.name] = Outcome(
            check, success=bool(item.success), evaluated=True, unexpected_count=unexpected,
            element_count=int(res.get("element_count") or len(frame)), failed=failed,
        )
    missing_results = [c.name for c in checks if c.name not in outcomes]
    if missing_results:
        raise RuntimeError(f"GX returned no result for: {', '.join(missing_results)}")
    return [outcomes[check.name] for check in checks]
