"""The trusted half of code grading: tests parsed into calls and expected values, the sandbox's answers
decoded strictly, and the verdict decided here, in a process the graded code never ran in (Invariant 7).

A test program is split with `ast` into steps kept in their written order: setup code (every top-level
statement that is not an assert; it runs inside the sandbox) and checks, so a stateful test
(`c = Counter(); assert c.get() == 0; c.inc(); assert c.get() == 1`) is asked as it was written. Supported
assert shapes, each applied to a CALL (any expression that is not a literal; it is evaluated inside the
sandbox):

    assert CALL == EXPR              (or EXPR == CALL)   EXPR: a literal, or set/sorted/frozenset of one
    assert A and B and ...           each operand one of these shapes
    assert CALL    /    assert not CALL
    assert set(CALL) == ..., sorted(CALL) == ...         the wrapper is applied here, to the decoded value
    assert math.isclose(CALL, EXPR, rel_tol=..., abs_tol=...)   (or isclose(...))

Expected values are evaluated here with `ast.literal_eval` and never enter the sandbox. The sandbox
answers each call (by an id this side chose) with a type-tagged encoding of exact built-in values and of
the standard library's values a test compares with literals (Counter, OrderedDict and defaultdict as dict,
namedtuples as tuple, IntEnum/IntFlag as int, deque, Decimal, Fraction; rr.tasks.sandbox.encode_value);
they are rebuilt here as trusted values and compared as Python compares those types. An instance of a class
the solution defined cannot be encoded, so an object whose `__eq__` always says True never reaches a
comparison: it is graded "error", unsupported result type. Anything else in the answers (a missing,
extra, repeated, unrequested or malformed record, too deep, too large) fails the run.

The runner cannot know that a check failed (it never sees the expected value), so it goes on; the verdict
walks the answers in the written order and stops at the first check that fails or raised, as the test
program would have stopped there: what ran after it (a timeout, a crash) does not change a "failed".
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any, Sequence

from rr.errors import RRError

MAX_ANSWER_BYTES = 8 * 1024 * 1024  # all answers of one run together; the supervisor stops reading beyond
MAX_DEPTH = 100  # nesting of one decoded value
MAX_NODES = 1_000_000  # values inside one run's answers
# An expected literal holds at most 4,300 decimal digits (Python's int_max_str_digits), about 3,571 hex digits,
# so a longer answer equals none; the cap also keeps int↔Decimal and Fraction work here small.
MAX_INT_HEX_DIGITS = 4096
MAX_SAME_HASH = 64  # unequal set/dict keys sharing one hash (crafted collisions make building quadratic)
_TEXT_CHARS = 200  # quoted source, values and messages in a detail

_WRAPPERS = {"set": set, "sorted": sorted, "frozenset": frozenset}
_CALL_WRAPPERS = ("set", "sorted")  # wrappers recognised around the sandboxed call


class UnsupportedTest(RRError):
    """A test statement whose shape the trusted grader cannot check; the run fails closed."""


@dataclass(frozen=True)
class Check:
    """One assert (or one operand of an `and` chain): `expression` runs in the sandbox, the rest here.

    mode: "equal" (wrapped value == expected), "truthy", "falsy" or "isclose" (math.isclose with
    `tolerances`). `wrappers` are applied innermost first to the decoded value.
    """

    expression: str
    mode: str
    source: str
    expected: Any = None
    wrappers: tuple[str, ...] = ()
    tolerances: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TestPlan:
    """What a test program asks, in its written order: `steps` holds setup code to run in the sandbox (a
    str) and checks (an int, the index into `checks`)."""

    steps: tuple[str | int, ...]
    checks: tuple[Check, ...]


@dataclass
class Answers:
    """The sandbox's answers after strict validation. `problem` is the first reason they are unusable."""

    layers: tuple[str, ...] = ()
    values: dict[str, Any] = field(default_factory=dict)
    raised: dict[str, tuple[str, str]] = field(default_factory=dict)
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (stage, exception type, message)
    problem: str | None = None


# ---------------------------------------------------------------------------------------------
# Test programs → checks
# ---------------------------------------------------------------------------------------------

def plan_tests(test_source: str) -> TestPlan:
    """Parse a test program into setup code and checks; UnsupportedTest names any shape it cannot check."""
    try:
        tree = ast.parse(test_source)
    except (SyntaxError, ValueError) as exc:
        raise UnsupportedTest(f"the tests do not parse: {exc}") from None
    steps: list[str | int] = []
    checks: list[Check] = []
    for statement in tree.body:
        if isinstance(statement, ast.Assert):
            for check in _checks_of(statement.test, test_source):
                steps.append(len(checks))
                checks.append(check)
            continue
        nested = next((node for node in ast.walk(statement) if isinstance(node, ast.Assert)), None)
        if nested is not None:
            raise UnsupportedTest(f"test line {nested.lineno}: an assert inside a {type(statement).__name__} "
                                  f"statement is not supported (only top-level asserts are checked): "
                                  f"{_quote(ast.get_source_segment(test_source, nested))}")
        source = None if getattr(statement, "decorator_list", None) else ast.get_source_segment(test_source, statement)
        source = source or ast.unparse(statement)  # a decorated def's segment would start after its decorators
        if steps and isinstance(steps[-1], str):
            steps[-1] += "\n" + source  # consecutive statements run as one block
        else:
            steps.append(source)
    return TestPlan(steps=tuple(steps), checks=tuple(checks))


def _checks_of(test: ast.expr, source: str) -> list[Check]:
    text = ast.get_source_segment(source, test) or ast.unparse(test)
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return [check for operand in test.values for check in _checks_of(operand, source)]
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        if isinstance(test.operand, (ast.Compare, ast.BoolOp)):
            raise _unsupported(test, text, "`not` of a comparison or of and/or")
        return [Check(expression=_sandboxed(test.operand, text), mode="falsy", source=text)]
    if isinstance(test, ast.Compare):
        if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
            raise _unsupported(test, text, f"the comparison {type(test.ops[0]).__name__} (only a single == is)")
        left, right = test.left, test.comparators[0]
        if _is_literal(left) and not _is_literal(right):
            left, right = right, left
        if not _is_literal(right):
            raise _unsupported(test, text, "neither side of == is a literal expected value")
        call, wrappers = _unwrap(left)
        return [Check(expression=_sandboxed(call, text), mode="equal", source=text,
                      expected=_literal(right), wrappers=wrappers)]
    if isinstance(test, ast.Call) and _is_isclose(test.func):
        return [_isclose_check(test, text)]
    if isinstance(test, (ast.BoolOp, ast.IfExp, ast.NamedExpr, ast.Lambda)):
        raise _unsupported(test, text, f"a {type(test).__name__} expression")
    return [Check(expression=_sandboxed(test, text), mode="truthy", source=text)]


def _isclose_check(test: ast.Call, text: str) -> Check:
    if len(test.args) != 2:
        raise _unsupported(test, text, "math.isclose without exactly two positional arguments")
    left, right = test.args
    if _is_literal(left) and not _is_literal(right):
        left, right = right, left
    if not _is_literal(right):
        raise _unsupported(test, text, "math.isclose whose expected value is not a literal")
    tolerances = []
    for keyword in test.keywords:
        if keyword.arg not in ("rel_tol", "abs_tol") or not _is_literal(keyword.value):
            raise _unsupported(test, text, f"math.isclose keyword {keyword.arg!r} (rel_tol/abs_tol literals only)")
        tolerances.append((keyword.arg, _literal(keyword.value)))
    expected = _literal(right)
    if type(expected) not in (int, float):
        raise _unsupported(test, text, "math.isclose with a non-numeric expected value")
    return Check(expression=_sandboxed(left, text), mode="isclose", source=text, expected=expected,
                 tolerances=tuple(tolerances))


def _is_isclose(func: ast.expr) -> bool:
    return ((isinstance(func, ast.Attribute) and func.attr == "isclose" and isinstance(func.value, ast.Name)
             and func.value.id == "math") or (isinstance(func, ast.Name) and func.id == "isclose"))


def _unwrap(node: ast.expr) -> tuple[ast.expr, tuple[str, ...]]:
    """set(sorted(CALL)) → (CALL, ("sorted", "set")): wrappers applied here, innermost first."""
    wrappers: list[str] = []
    while (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALL_WRAPPERS
           and len(node.args) == 1 and not node.keywords and not isinstance(node.args[0], ast.Starred)):
        wrappers.append(node.func.id)
        node = node.args[0]
    return node, tuple(reversed(wrappers))


def _is_literal(node: ast.expr) -> bool:
    try:
        _literal(node)
    except UnsupportedTest:
        return False
    return True


def _literal(node: ast.expr) -> Any:
    """A literal, or set()/set(LIT)/frozenset(LIT)/sorted(LIT), evaluated here and only here."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _WRAPPERS \
            and not node.keywords and len(node.args) <= 1:
        inner = _literal(node.args[0]) if node.args else ()
        try:
            return _WRAPPERS[node.func.id](inner)
        except TypeError as exc:
            raise UnsupportedTest(f"{ast.unparse(node)}: {exc}") from None
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise UnsupportedTest(f"{_quote(ast.unparse(node))} is not a literal") from None


def _sandboxed(node: ast.expr, text: str) -> str:
    """The source the sandbox evaluates. A constant (`assert True`) is sent too: a solution that
    crashes or never answers still fails it. A comparison (or isclose) inside it would be decided in
    the sandbox, by the solution's objects (`bool(f(1) == 2)` with an always-equal `__eq__`): it fails
    closed."""
    for inner in ast.walk(node):
        if isinstance(inner, ast.Compare) or (isinstance(inner, ast.Call) and _is_isclose(inner.func)):
            raise _unsupported(node, text, "a comparison inside the checked call (it would be decided by the "
                                           "solution's own objects)")
    return ast.unparse(node)


def _unsupported(node: ast.expr, text: str, what: str) -> UnsupportedTest:
    return UnsupportedTest(f"test line {getattr(node, 'lineno', '?')}: {what} is not a supported test shape "
                           f"in {_quote(text)}; write `assert CALL == LITERAL`, `assert [not] CALL` or "
                           "`assert math.isclose(CALL, LITERAL)`")


def _quote(text: str | None) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= _TEXT_CHARS else text[:_TEXT_CHARS] + "…")


# ---------------------------------------------------------------------------------------------
# Answers: strict decoding of what the sandboxed process wrote (it may have written anything)
# ---------------------------------------------------------------------------------------------

class _Malformed(Exception):
    pass


def _reject_constant(name: str):
    raise _Malformed(f"bare JSON constant {name}")


def decode_answers(raw: bytes, requested: Sequence[str]) -> Answers:
    """Validate the runner's records: first `["layers", [names]]`, then per requested id exactly one
    `["value", id, ENCODED]` or `["raised", id, type, message]`, plus `["error", stage, type, message]`
    records that only explain a failure. The first violation is kept in `Answers.problem`."""
    answers = Answers()
    wanted = set(requested)
    if len(raw) > MAX_ANSWER_BYTES:
        answers.problem = f"the sandbox wrote more than {MAX_ANSWER_BYTES} bytes of answers"
        first = raw[:4096].split(b"\n", 1)[0]
        answers.layers = decode_answers(first + b"\n", ()).layers  # still reported
        return answers
    budget = [MAX_NODES]
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines):
        try:
            record = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
            if type(record) is not list or not record or type(record[0]) is not str:
                raise _Malformed("a record is not a tagged list")
            kind = record[0]
            if kind == "layers":
                if number != 0 or len(record) != 2 or type(record[1]) is not list \
                        or not all(type(name) is str and len(name) < 40 for name in record[1]):
                    raise _Malformed("a layers record that is not the first, well-formed record")
                answers.layers = tuple(record[1])
            elif kind in ("value", "raised"):
                if len(record) < 3 or type(record[1]) is not str:
                    raise _Malformed(f"a {kind} record without an id")
                answer_id = record[1]
                if answer_id not in wanted:
                    raise _Malformed("an answer to a call that was not asked for")
                if answer_id in answers.values or answer_id in answers.raised:
                    raise _Malformed("two answers to one call")
                if kind == "value":
                    if len(record) != 3:
                        raise _Malformed("a value record of the wrong length")
                    answers.values[answer_id] = decode_value(record[2], budget)
                else:
                    if len(record) != 4 or type(record[2]) is not str or type(record[3]) is not str:
                        raise _Malformed("a raised record of the wrong shape")
                    answers.raised[answer_id] = (record[2][:_TEXT_CHARS], record[3][:_TEXT_CHARS])
            elif kind == "error":
                if len(record) != 4 or not all(type(part) is str for part in record[1:]):
                    raise _Malformed("an error record of the wrong shape")
                if len(answers.errors) < 4:
                    answers.errors.append(tuple(part[:_TEXT_CHARS] for part in record[1:]))  # type: ignore
            else:
                raise _Malformed(f"an unknown record kind {kind[:20]!r}")
        except (_Malformed, ValueError, UnicodeDecodeError, RecursionError, MemoryError, TypeError,
                ArithmeticError) as exc:
            reason = str(exc) if isinstance(exc, _Malformed) else f"{type(exc).__name__}: {str(exc)[:_TEXT_CHARS]}"
            answers.problem = f"the sandbox's answers are malformed (record {number + 1}: {reason})"
            return answers
    return answers


def decode_value(node: Any, budget: list[int] | None = None, depth: int = 0) -> Any:
    """One type-tagged value → the exact built-in value it names; _Malformed (a ValueError's cousin)
    for anything else. Tags: N None, B bool (0/1), i int (hex), f float (float.hex, inf, nan),
    c complex ([real, imag] as f), s str, y bytes (hex), l list, t tuple, S set, F frozenset, q deque,
    d dict (list of [key, value]), D Decimal (its str), Q Fraction ([numerator, denominator] as i)."""
    if budget is None:
        budget = [MAX_NODES]
    budget[0] -= 1
    if budget[0] < 0:
        raise _Malformed(f"more than {MAX_NODES} values")
    if depth > MAX_DEPTH:
        raise _Malformed(f"a value nested deeper than {MAX_DEPTH}")
    if type(node) is not list or not node or type(node[0]) is not str:
        raise _Malformed("a value that is not a tagged list")
    tag, args = node[0], node[1:]
    if tag == "N" and not args:
        return None
    if len(args) != 1:
        raise _Malformed(f"a value tagged {tag[:5]!r} with {len(args)} fields")
    payload = args[0]
    if tag == "B" and type(payload) is int and payload in (0, 1):
        return payload == 1
    if tag == "i":
        return _hex_int(payload)
    if tag == "f":
        return _hex_float(payload)
    if tag == "c" and type(payload) is list and len(payload) == 2:
        return complex(_hex_float(payload[0]), _hex_float(payload[1]))
    if tag == "D" and type(payload) is str and len(payload) <= _DECIMAL_CHARS and _DECIMAL.fullmatch(payload):
        return Decimal(payload)
    if tag == "Q" and type(payload) is list and len(payload) == 2:
        numerator, denominator = _hex_int(payload[0]), _hex_int(payload[1])
        if denominator > 0:
            return Fraction(numerator, denominator)
    if tag == "s" and type(payload) is str:
        return payload
    if tag == "y" and type(payload) is str:
        return bytes.fromhex(payload)
    if tag in _SEQUENCES and type(payload) is list:
        items = [decode_value(item, budget, depth + 1) for item in payload]
        if tag in ("S", "F"):
            _check_hash_collisions(items)
        return _SEQUENCES[tag](items)  # TypeError: unhashable
    if tag == "d" and type(payload) is list:
        pairs = []
        for pair in payload:
            if type(pair) is not list or len(pair) != 2:
                raise _Malformed("a dict entry that is not a [key, value] pair")
            pairs.append((decode_value(pair[0], budget, depth + 1), decode_value(pair[1], budget, depth + 1)))
        _check_hash_collisions([key for key, _ in pairs])
        return dict(pairs)
    raise _Malformed(f"an invalid value tagged {tag[:5]!r}")


_SEQUENCES = {"l": list, "t": tuple, "S": set, "F": frozenset, "q": deque}
# Decimal.__str__'s forms (e with the context's capitals off), the exponent bounded: a forged 1E+10**18
# overflows Decimal, and a large one makes every comparison with an int or a Fraction slow.
_DECIMAL = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([Ee][+-]?\d{1,6})?|-?(Infinity|s?NaN\d{0,100})")
_DECIMAL_CHARS = 5000


def _hex_int(payload: Any) -> int:
    if type(payload) is str and 0 < len(payload) <= MAX_INT_HEX_DIGITS:
        digits = payload[1:] if payload.startswith("-") else payload
        if digits and all(c in "0123456789abcdef" for c in digits):
            return int(payload, 16)
    raise _Malformed("an invalid int")


def _hex_float(payload: Any) -> float:
    if type(payload) is str and len(payload) <= 40:
        try:
            return float.fromhex(payload)  # accepts inf, -inf, nan
        except (ValueError, OverflowError):
            pass
    raise _Malformed("an invalid float")


def _check_hash_collisions(items: Sequence[Any]) -> None:
    """Refuse keys crafted to share one hash (ints k·(2**61 - 1)): a set or dict of them takes
    quadratic time to build, hours for 8 MB of answers. Unequal values with equal hashes are rare
    in genuine answers; more than MAX_SAME_HASH of them are an attack. TypeError: unhashable."""
    counts: dict[int, int] = {}
    for item in items:
        key = hash(item)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > MAX_SAME_HASH:
            raise _Malformed(f"more than {MAX_SAME_HASH} set or dict keys with one hash")


# ---------------------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------------------

def check_holds(check: Check, value: Any) -> bool:
    """Whether a decoded (trusted) value satisfies the check; a wrapper or comparison that cannot apply to it
    (sorted of mixed types, set of lists, a signalling NaN) is a failure, not an error of rr. A deque is
    compared as a list where the expected value has a list in its place."""
    try:
        if check.mode == "truthy":
            return bool(value)
        if check.mode == "falsy":
            return not value
        if check.mode == "isclose":
            return type(value) in (int, float, Fraction, Decimal) \
                and math.isclose(value, check.expected, **dict(check.tolerances))
        for wrapper in check.wrappers:
            if wrapper in ("set", "frozenset"):
                _check_hash_collisions(list(value))
            value = _WRAPPERS[wrapper](value)
        return bool(_shaped_like(value, check.expected) == check.expected)
    except (TypeError, ValueError, OverflowError, RecursionError, ArithmeticError, _Malformed):
        return False


def _shaped_like(value: Any, expected: Any, depth: int = 0) -> Any:
    """`value` with each deque that stands where `expected` has a list turned into that list (a test writes
    `assert window(...) == [1, 2]` of a function that returns a deque)."""
    if depth > MAX_DEPTH:
        return value
    if type(value) is deque and type(expected) is list:
        value = list(value)
    if type(value) in (list, tuple) and type(value) is type(expected) and len(value) == len(expected):
        return type(value)(_shaped_like(v, e, depth + 1) for v, e in zip(value, expected))
    if type(value) is dict and type(expected) is dict:
        return {k: _shaped_like(v, expected[k], depth + 1) if k in expected else v for k, v in value.items()}
    return value


def describe(value: Any) -> str:
    """A short repr of a decoded value for a failure's detail."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int too long for repr
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _TEXT_CHARS else text[:_TEXT_CHARS] + "…"


def decide(plan: TestPlan, ids: Sequence[str], raw: bytes, report: dict) -> tuple[str, str, tuple[str, ...]]:
    """The verdict (status, detail, layers) from the answers and the supervisor's observation of the
    runner (`outcome`: exited, timeout or oversized; `exit_code`, `signal`, `elapsed_s`, `timeout_s`,
    `stderr_tail`). The checks are walked in their written order: the first that fails or raised decides,
    whatever happened after it. passed needs every check answered with a value that holds and a clean exit."""
    outcome = report.get("outcome")
    if outcome == "oversized":
        layers = decode_answers(raw[:4096].split(b"\n", 1)[0] + b"\n", ()).layers
        return "error", f"the sandbox wrote more than {MAX_ANSWER_BYTES} bytes of answers; it was stopped", layers
    raw = raw[:raw.rfind(b"\n") + 1]  # a record cut off (a kill, a signal) is no answer; it can only go missing
    answers = decode_answers(raw, ids)
    layers = answers.layers
    if outcome not in ("exited", "timeout"):
        return "error", f"the sandbox supervisor reported an unknown outcome {str(outcome)[:40]!r}", layers
    if answers.problem:
        return "error", answers.problem, layers
    unanswered = 0
    for index, (check, answer_id) in enumerate(zip(plan.checks, ids)):
        if answer_id in answers.raised:
            kind, message = answers.raised[answer_id]
            status = "memory" if kind == "MemoryError" else "error"
            if kind == "UnsupportedResultType":
                return status, f"{message} [returned by {_quote(check.expression)} in: {_quote(check.source)}]", layers
            return status, f"{_quote(check.expression)} raised {kind}: {message} [in: {_quote(check.source)}]", layers
        if answer_id not in answers.values:
            unanswered = len(plan.checks) - index
            break
        value = answers.values[answer_id]
        if not check_holds(check, value):
            return "failed", f"assertion failed: {check.source} (got {describe(value)})", layers
    if outcome == "timeout":
        return "timeout", f"wall-clock limit of {report.get('timeout_s', 0):g} s exceeded", layers
    if report.get("signal") == "SIGXCPU":
        return "timeout", f"CPU-time limit exceeded after {report.get('elapsed_s', 0)} s", layers
    for stage, kind, message in answers.errors:
        status = "memory" if kind == "MemoryError" else "error"
        where = {"solution": "the solution", "setup": "the test setup"}.get(stage, stage)
        return status, f"{kind} in {where}: {message}", layers
    if unanswered or report.get("signal") or report.get("exit_code") != 0:
        how = (f"killed by {report['signal']}" + (" (a file or the output exceeded the size limit)"
                                                  if report["signal"] == "SIGXFSZ" else "")
               if report.get("signal") else f"exited with code {report.get('exit_code')}")
        what = f"{unanswered} of {len(plan.checks)} checks unanswered" if unanswered else "all checks answered"
        tail = str(report.get("stderr_tail", ""))[-1000:]
        return "error", f"the sandboxed process {how}, {what}: {tail}", layers
    if not plan.checks:
        return "error", "the tests hold no checks: nothing shows the solution works", layers
    return "passed", f"all {len(plan.checks)} checks passed", layers
