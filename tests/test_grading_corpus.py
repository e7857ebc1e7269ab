"""A grading corpus: idiomatic solutions, right and wrong, with the verdict the code grader must give each.

Every row is (id, solution, tests, expected status, reason). CORRECT rows must be graded "passed"; WRONG rows
must be graded exactly the status they name: "failed" when a check's value is wrong, "error" when something
raises or the result's type cannot be graded ("unsupported result type"). They pin down what a test author expects from `rr.tasks.sandbox.run_many`:

- tests run in their written order, setup statements between the asserts (stateful classes, generators);
- standard-library results compare as Python compares them: Counter, OrderedDict and defaultdict as dict,
  namedtuples as tuple, IntEnum/IntFlag members as int, Decimal/Fraction/complex/bytes/set/frozenset as
  themselves; a deque as a list when the expected literal is a list (Python itself says deque != list);
- a user-defined result type (dataclass, plain Enum, a Counter or list subclass) is an error naming the type;
- a solution that leaves a 1500-level directory tree behind is graded on its checks like any other, and the
  rest of its batch is graded normally (the tree made the whole batch raise before).

Each table is graded in one run_many call (a module-scoped fixture); the hanging rows run separately with a
short timeout. test_rows_agree_with_plain_python checks the labels themselves against plain Python.
"""

from __future__ import annotations

import textwrap

import pytest

from rr.tasks.sandbox import STATUSES, run_many


def src(text: str) -> str:
    """A multi-line solution or test program written indented in this file."""
    return textwrap.dedent(text).strip("\n") + "\n"


COUNTER_CLASS_TESTS = src("""
    c = Counter()
    assert c.get() == 0
    c.inc()
    assert c.get() == 1
    c.inc()
    c.inc()
    assert c.get() == 3
    """)

STACK_TESTS = src("""
    s = Stack()
    s.push(1)
    s.push(2)
    assert s.pop() == 2
    s.push(3)
    assert s.peek() == 3
    assert s.pop() == 3
    assert s.pop() == 1
    assert s.is_empty()
    """)

ACCOUNT_TESTS = src("""
    acct = Account(100)
    acct.deposit(50)
    assert acct.balance() == 150
    acct.withdraw(30)
    assert acct.balance() == 120
    assert not acct.withdraw(500)
    assert acct.balance() == 120
    """)

LRU_TESTS = src("""
    cache = LRUCache(2)
    cache.put('a', 1)
    cache.put('b', 2)
    assert cache.get('a') == 1
    cache.put('c', 3)
    assert cache.get('b') == -1
    assert cache.get('a') == 1
    assert cache.get('c') == 3
    """)

PERM_ENUM = src("""
    from enum import IntFlag

    class Perm(IntFlag):
        R = 4
        W = 2
        X = 1
    """)

STATUS_ENUM = src("""
    from enum import IntEnum

    class Status(IntEnum):
        OK = 200
        NOT_FOUND = 404
    """)

# (id, solution, tests, expected status, reason)
CORRECT = [
    ("counter_char_frequency", "from collections import Counter\n\ndef char_frequency(s):\n    return Counter(s)\n",
     "assert char_frequency('aab') == {'a': 2, 'b': 1}\nassert char_frequency('') == {}", "passed",
     "a Counter compares equal to the dict of its counts"),
    ("counter_word_counts", src("""
        from collections import Counter

        def word_counts(text):
            return Counter(word.lower() for word in text.split())
        """), "assert word_counts('The cat the hat') == {'the': 2, 'cat': 1, 'hat': 1}", "passed",
     "Counter over a generator of lowercased words"),
    ("counter_subtraction", src("""
        from collections import Counter

        def missing_letters(note, magazine):
            return Counter(note) - Counter(magazine)
        """), "assert missing_letters('aabbc', 'abc') == {'a': 1, 'b': 1}\nassert missing_letters('ab', 'abc') == {}",
     "passed", "Counter arithmetic drops non-positive counts; the result compares as a dict"),
    ("counter_most_common", src("""
        from collections import Counter

        def top_two(words):
            return Counter(words).most_common(2)
        """), "assert top_two(['a', 'b', 'a', 'c', 'b', 'a']) == [('a', 3), ('b', 2)]", "passed",
     "most_common returns a plain list of tuples"),
    ("defaultdict_group_by_length", src("""
        from collections import defaultdict

        def group_by_length(words):
            groups = defaultdict(list)
            for word in words:
                groups[len(word)].append(word)
            return groups
        """), "assert group_by_length(['a', 'bb', 'c', 'ddd']) == {1: ['a', 'c'], 2: ['bb'], 3: ['ddd']}", "passed",
     "a defaultdict(list) grouping compares as a dict"),
    ("defaultdict_int_tally", src("""
        from collections import defaultdict

        def tally_by_parity(numbers):
            totals = defaultdict(int)
            for n in numbers:
                totals['even' if n % 2 == 0 else 'odd'] += n
            return totals
        """), "assert tally_by_parity([1, 2, 3, 4]) == {'odd': 4, 'even': 6}", "passed",
     "a defaultdict(int) compares as a dict"),
    ("ordereddict_sorted_items", src("""
        from collections import OrderedDict

        def sorted_by_key(d):
            return OrderedDict(sorted(d.items()))
        """), "assert sorted_by_key({'b': 2, 'a': 1}) == {'a': 1, 'b': 2}", "passed",
     "an OrderedDict compares as a dict"),
    ("namedtuple_midpoint", src("""
        from collections import namedtuple

        Point = namedtuple('Point', 'x y')

        def midpoint(p, q):
            return Point((p[0] + q[0]) / 2, (p[1] + q[1]) / 2)
        """), "assert midpoint((0, 0), (4, 2)) == (2.0, 1.0)\nassert midpoint((1, 1), (1, 1)) == (1, 1)", "passed",
     "a collections.namedtuple compares as a tuple"),
    ("typing_namedtuple_bounds", src("""
        from typing import NamedTuple

        class Bounds(NamedTuple):
            low: int
            high: int

        def bounds(xs):
            return Bounds(min(xs), max(xs))
        """), "assert bounds([3, 1, 2]) == (1, 3)", "passed", "a typing.NamedTuple compares as a tuple"),
    ("namedtuples_in_a_list", src("""
        from collections import namedtuple

        Pair = namedtuple('Pair', ['key', 'value'])

        def parse_pairs(text):
            return [Pair(k, int(v)) for k, v in (item.split('=') for item in text.split(','))]
        """), "assert parse_pairs('a=1,b=2') == [('a', 1), ('b', 2)]", "passed",
     "namedtuples nested in a list compare as tuples"),
    ("intenum_status", STATUS_ENUM + src("""

        def lookup(path, routes):
            if path in routes:
                return Status.OK
            return Status.NOT_FOUND
        """), "assert lookup('/x', ['/']) == 404\nassert lookup('/', ['/']) == 200", "passed",
     "an IntEnum member compares as its int"),
    ("intflag_mode", PERM_ENUM + src("""

        def parse_mode(text):
            flags = {'r': Perm.R, 'w': Perm.W, 'x': Perm.X}
            perm = Perm(0)
            for ch in text:
                if ch in flags:
                    perm |= flags[ch]
            return perm
        """), "assert parse_mode('rw-') == 6\nassert parse_mode('r-x') == 5\nassert parse_mode('---') == 0", "passed",
     "IntFlag values (combined and empty) compare as ints"),
    ("deque_last_n", "from collections import deque\n\ndef last_n(xs, n):\n    return deque(xs, maxlen=n)\n",
     "assert last_n([1, 2, 3, 4, 5], 2) == [4, 5]", "passed", "a deque is graded as a list against a list literal"),
    ("deque_rotate", src("""
        from collections import deque

        def rotate_right(xs, k):
            d = deque(xs)
            d.rotate(k)
            return d
        """), "assert rotate_right([1, 2, 3, 4], 1) == [4, 1, 2, 3]", "passed", "deque.rotate, graded as a list"),
    ("fraction_vs_float", src("""
        from fractions import Fraction

        def mean(xs):
            return Fraction(sum(xs), len(xs))
        """), "assert mean([1, 2]) == 1.5\nassert mean([1, 2, 3]) == 2", "passed",
     "Fraction(3, 2) == 1.5 and Fraction(2) == 2 in Python"),
    ("fraction_half", "from fractions import Fraction\n\ndef half(n):\n    return Fraction(n, 2)\n",
     "assert half(1) == 0.5", "passed", "Fraction(1, 2) == 0.5 exactly"),
    ("decimal_split_bill", src("""
        from decimal import Decimal

        def split_bill(total, people):
            return Decimal(total) / people
        """), "assert split_bill('10', 4) == 2.5\nassert split_bill('9', 3) == 3", "passed",
     "Decimal('2.5') == 2.5 and Decimal('3') == 3 in Python (both exact)"),
    ("complex_rotate", "def rotate_quarter(z):\n    return z * 1j\n", "assert rotate_quarter(1 + 2j) == -2 + 1j",
     "passed", "complex results compare with a complex literal"),
    ("complex_sqrt", "import cmath\n\ndef root(x):\n    return cmath.sqrt(x)\n", "assert root(-4) == 2j",
     "passed", "cmath.sqrt(-4) is exactly 2j"),
    ("bytes_encode", "def to_utf8(s):\n    return s.encode('utf-8')\n",
     "assert to_utf8('h\\u00e9') == b'h\\xc3\\xa9'", "passed", "bytes compare with a bytes literal"),
    ("frozenset_letters", "def letters(word):\n    return frozenset(word)\n",
     "assert letters('abba') == frozenset({'a', 'b'})\nassert letters('abba') == {'a', 'b'}", "passed",
     "a frozenset equals an equal frozenset and an equal set"),
    ("set_common", "def common(a, b):\n    return set(a) & set(b)\n",
     "assert common([1, 2, 3], [2, 3, 4]) == {2, 3}\nassert common([1], [2]) == set()", "passed",
     "a set result against a set literal and set()"),
    ("set_and_sorted_wrappers", "def unique(xs):\n    return list(dict.fromkeys(xs))\n",
     "assert set(unique([3, 1, 3, 2])) == {1, 2, 3}\nassert sorted(unique([3, 1, 3, 2])) == [1, 2, 3]", "passed",
     "set(CALL) and sorted(CALL) wrappers"),
    ("stateful_counter_class", src("""
        class Counter:
            def __init__(self):
                self.n = 0

            def inc(self):
                self.n += 1

            def get(self):
                return self.n
        """), COUNTER_CLASS_TESTS, "passed", "checks between inc() calls see the state of their written place"),
    ("stateful_stack", src("""
        class Stack:
            def __init__(self):
                self.items = []

            def push(self, x):
                self.items.append(x)

            def pop(self):
                return self.items.pop()

            def peek(self):
                return self.items[-1]

            def is_empty(self):
                return not self.items
        """), STACK_TESTS, "passed", "pops interleaved with pushes; only the written order gives 2, 3, 3, 1"),
    ("stateful_bank_account", src("""
        class Account:
            def __init__(self, balance=0):
                self._balance = balance

            def deposit(self, amount):
                self._balance += amount

            def withdraw(self, amount):
                if amount > self._balance:
                    return False
                self._balance -= amount
                return True

            def balance(self):
                return self._balance
        """), ACCOUNT_TESTS, "passed", "balance checked after each deposit/withdrawal; an overdraft is refused"),
    ("stateful_lru_cache", src("""
        from collections import OrderedDict

        class LRUCache:
            def __init__(self, capacity):
                self.capacity = capacity
                self.data = OrderedDict()

            def get(self, key):
                if key not in self.data:
                    return -1
                self.data.move_to_end(key)
                return self.data[key]

            def put(self, key, value):
                self.data[key] = value
                self.data.move_to_end(key)
                if len(self.data) > self.capacity:
                    self.data.popitem(last=False)
        """), LRU_TESTS, "passed", "get('a') before put('c') makes 'b' the one evicted"),
    ("stateful_generator", src("""
        def countdown(n):
            while n > 0:
                yield n
                n -= 1
        """), "g = countdown(3)\nassert next(g) == 3\nnext(g)\nassert list(g) == [1]", "passed",
     "a generator advanced between checks, in written order"),
    ("iterator_class", src("""
        class Countdown:
            def __init__(self, start):
                self.current = start

            def __iter__(self):
                return self

            def __next__(self):
                if self.current <= 0:
                    raise StopIteration
                self.current -= 1
                return self.current + 1
        """), "it = Countdown(3)\nnext(it)\nassert list(it) == [2, 1]", "passed",
     "an iterator class consumed by list()"),
    ("generator_evens", "def evens(n):\n    yield from range(0, n, 2)\n",
     "assert list(evens(7)) == [0, 2, 4, 6]\nassert list(evens(0)) == []", "passed", "a generator consumed by list()"),
    ("generator_fib_islice", src("""
        def fib():
            a, b = 0, 1
            while True:
                yield a
                a, b = b, a + b
        """), "from itertools import islice\nassert list(islice(fib(), 7)) == [0, 1, 1, 2, 3, 5, 8]", "passed",
     "an infinite generator cut by islice imported in the test setup"),
    ("early_return_first_negative", src("""
        def first_negative(xs):
            for x in xs:
                if x < 0:
                    return x
            return None
        """), "assert first_negative([3, -1, -5]) == -1\nassert first_negative([1, 2]) == None", "passed",
     "return from inside the loop; None when nothing matches"),
    ("recursion_factorial", "def factorial(n):\n    return 1 if n <= 1 else n * factorial(n - 1)\n",
     "assert factorial(0) == 1\nassert factorial(5) == 120\nassert factorial(20) == 2432902008176640000", "passed",
     "plain recursion, large ints"),
    ("recursion_flatten", src("""
        def flatten(items):
            out = []
            for item in items:
                if isinstance(item, list):
                    out.extend(flatten(item))
                else:
                    out.append(item)
            return out
        """), "assert flatten([1, [2, [3, [4]]], 5]) == [1, 2, 3, 4, 5]", "passed", "recursion over nested lists"),
    ("recursion_memoized_fib", src("""
        from functools import lru_cache

        @lru_cache(maxsize=None)
        def fib(n):
            return n if n < 2 else fib(n - 1) + fib(n - 2)
        """), "assert fib(10) == 55\nassert fib(90) == 2880067194370816120", "passed", "memoized recursion"),
    ("string_title_case", "def title_case(s):\n    return ' '.join(word.capitalize() for word in s.split())\n",
     "assert title_case('hello  wORLD') == 'Hello World'", "passed", "split/capitalize/join"),
    ("string_palindrome", src("""
        def is_palindrome(s):
            cleaned = [c.lower() for c in s if c.isalnum()]
            return cleaned == cleaned[::-1]
        """), "assert is_palindrome('A man, a plan, a canal: Panama')\nassert not is_palindrome('abc')", "passed",
     "`assert CALL` and `assert not CALL`"),
    ("string_camel_to_snake",
     "import re\n\ndef snake(name):\n    return re.sub(r'(?<!^)(?=[A-Z])', '_', name).lower()\n",
     "assert snake('parseHttpResponse') == 'parse_http_response'", "passed", "a regex substitution"),
    ("sorted_by_length_then_alpha", "def by_length(words):\n    return sorted(words, key=lambda w: (len(w), w))\n",
     "assert by_length(['ccc', 'b', 'aa', 'a']) == ['a', 'b', 'aa', 'ccc']", "passed", "sorted with a tuple key"),
    ("sorted_records_itemgetter", src("""
        from operator import itemgetter

        def youngest_first(people):
            return sorted(people, key=itemgetter('age'))
        """), "assert youngest_first([{'n': 'a', 'age': 30}, {'n': 'b', 'age': 20}]) == "
              "[{'n': 'b', 'age': 20}, {'n': 'a', 'age': 30}]", "passed", "a list of dicts sorted with itemgetter"),
    ("isclose_mean", "def mean(xs):\n    return sum(xs) / len(xs)\n",
     "import math\nassert math.isclose(mean([0.1, 0.2, 0.3]), 0.2, rel_tol=1e-9)", "passed",
     "math.isclose with rel_tol"),
    ("isclose_sample_stdev", "import statistics\n\ndef sample_std(xs):\n    return statistics.stdev(xs)\n",
     "from math import isclose\nassert isclose(sample_std([2, 4, 4, 4, 5, 5, 7, 9]), 2.138089935299395, rel_tol=1e-9)",
     "passed", "a bare isclose imported in the setup"),
    ("and_chain_leap_year", "def is_leap(y):\n    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)\n",
     "assert is_leap(2000) and not is_leap(1900) and is_leap(2024)", "passed", "`assert A and not B and C`"),
]

WRONG = [
    ("stateful_forge_counter_inc_noop", src("""
        class Counter:
            def __init__(self):
                self.n = 0

            def inc(self):
                pass

            def get(self):
                return self.n
        """), COUNTER_CLASS_TESTS, "failed", "inc() does nothing: in written order get() is still 0 after inc()"),
    ("deep_directory_tree", src("""
        import os

        def dig(levels):
            for _ in range(levels):
                os.mkdir('d')
                os.chdir('d')
            return levels - 1
        """), "assert dig(1500) == 1500", "failed",
     "off by one, and leaves a 1500-level tree behind: removed, graded on its own, the batch graded normally"),
    ("off_by_one_sum_to", "def sum_to(n):\n    return sum(range(n))\n", "assert sum_to(4) == 10", "failed",
     "range(n) stops before n"),
    ("off_by_one_nth_fib", src("""
        def nth_fib(n):
            a, b = 0, 1
            for _ in range(n + 1):
                a, b = b, a + b
            return a
        """), "assert nth_fib(0) == 0\nassert nth_fib(10) == 55", "failed", "one iteration too many"),
    ("off_by_one_last_n", "def last_n(xs, n):\n    return xs[-n - 1:]\n", "assert last_n([1, 2, 3, 4], 2) == [3, 4]",
     "failed", "slices one element too many"),
    ("off_by_one_binary_search", src("""
        def index_of(xs, target):
            lo, hi = 0, len(xs) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if xs[mid] == target:
                    return mid
                if xs[mid] < target:
                    lo = mid + 1
                else:
                    hi = mid - 1
            return -1
        """), "assert index_of([1, 3, 5, 7], 1) == 0\nassert index_of([1, 3, 5, 7], 7) == 3", "failed",
     "`lo < hi` misses the last candidate"),
    ("dataclass_result", src("""
        from dataclasses import dataclass

        @dataclass
        class InventoryItem:
            name: str
            qty: int

        def make_item(name, qty):
            return InventoryItem(name, qty)
        """), "assert make_item('bolt', 3) == ('bolt', 3)", "error",
     "a dataclass instance is an unsupported result type"),
    ("plain_enum_result", src("""
        from enum import Enum

        class TrafficLight(Enum):
            RED = 1
            GREEN = 2

        def next_light(light):
            return TrafficLight.GREEN
        """), "assert next_light(1) == 2", "error", "a plain Enum member is an unsupported result type"),
    ("counter_subclass_eq_true", src("""
        from collections import Counter

        class AgreeableCounter(Counter):
            def __eq__(self, other):
                return True

        def char_frequency(s):
            return AgreeableCounter()
        """), "assert char_frequency('aab') == {'a': 2, 'b': 1}", "error",
     "a Counter subclass whose __eq__ says True is a user class, not a Counter"),
    ("list_subclass_eq_true", src("""
        class AlwaysEqualList(list):
            def __eq__(self, other):
                return True

        def sort_desc(xs):
            return AlwaysEqualList()
        """), "assert sort_desc([1, 3, 2]) == [3, 2, 1]", "error", "a list subclass is a user class"),
    ("namedtuple_wrong_tuple", src("""
        from collections import namedtuple

        Point = namedtuple('Point', 'x y')

        def midpoint(p, q):
            return Point((p[0] + q[0]) // 2, (p[1] + q[1]) // 2)
        """), "assert midpoint((0, 0), (4, 2)) == (2, 2)", "failed", "Point(2, 1) != (2, 2)"),
    ("typing_namedtuple_swapped", src("""
        from typing import NamedTuple

        class Bounds(NamedTuple):
            low: int
            high: int

        def bounds(xs):
            return Bounds(max(xs), min(xs))
        """), "assert bounds([3, 1, 2]) == (1, 3)", "failed", "fields swapped: (3, 1) != (1, 3)"),
    ("namedtuple_vs_list_literal", "from collections import namedtuple\n\nP = namedtuple('P', 'x y')\n\n"
     "def origin():\n    return P(0, 0)\n", "assert origin() == [0, 0]", "failed", "a tuple never equals a list"),
    ("deque_wrong_list", src("""
        from collections import deque

        def rotate_right(xs, k):
            d = deque(xs)
            d.rotate(-k)
            return d
        """), "assert rotate_right([1, 2, 3, 4], 1) == [4, 1, 2, 3]", "failed", "rotated left: [2, 3, 4, 1]"),
    ("counter_wrong_counts", src("""
        from collections import Counter

        def word_counts(text):
            return Counter(text.split())
        """), "assert word_counts('The cat the hat') == {'the': 2, 'cat': 1, 'hat': 1}", "failed",
     "case not folded: 'The' and 'the' counted apart"),
    ("counter_zero_count_key", src("""
        from collections import Counter

        def tally(words, vocabulary):
            counts = Counter({word: 0 for word in vocabulary})
            counts.update(words)
            return counts
        """), "assert tally(['a', 'a'], ['a', 'b']) == {'a': 2}", "failed",
     "{'a': 2, 'b': 0} != {'a': 2}: as a dict, a zero count is still a key"),
    ("defaultdict_wrong_grouping", src("""
        from collections import defaultdict

        def group_by_length(words):
            groups = defaultdict(list)
            for word in words:
                groups[word[0]].append(word)
            return groups
        """), "assert group_by_length(['a', 'bb', 'c']) == {1: ['a', 'c'], 2: ['bb']}", "failed",
     "grouped by first letter, not length"),
    ("ordereddict_wrong_values", src("""
        from collections import OrderedDict

        def inverted(d):
            return OrderedDict((k, k) for k in d)
        """), "assert inverted({'a': 1}) == {1: 'a'}", "failed", "keys kept instead of inverted"),
    ("intenum_wrong_member", STATUS_ENUM + "\n\ndef lookup(path, routes):\n    return Status.OK\n",
     "assert lookup('/x', ['/']) == 404", "failed", "Status.OK == 200, not 404"),
    ("intflag_missing_bit", PERM_ENUM + src("""

        def parse_mode(text):
            perm = Perm(0)
            if 'r' in text:
                perm |= Perm.R
            return perm
        """), "assert parse_mode('rw-') == 6", "failed", "the W bit is never set: 4 != 6"),
    ("fraction_vs_rounded_float", "from fractions import Fraction\n\ndef third():\n    return Fraction(1, 3)\n",
     "assert third() == 0.3333333333333333", "failed", "Fraction(1, 3) is not the float nearest 1/3 in Python"),
    ("decimal_point_one_vs_float", src("""
        from decimal import Decimal

        def total(prices):
            return sum(Decimal(p) for p in prices)
        """), "assert total(['0.1', '0.2']) == 0.3", "failed",
     "Decimal('0.3') != 0.3: the float is not exactly 3/10"),
    ("complex_conjugate", "def rotate_quarter(z):\n    return z * -1j\n", "assert rotate_quarter(1 + 2j) == -2 + 1j",
     "failed", "rotated the wrong way: 2 - 1j"),
    ("bytes_vs_str", "def to_utf8(s):\n    return s\n", "assert to_utf8('abc') == b'abc'", "failed",
     "a str never equals bytes"),
    ("frozenset_missing_element", "def letters(word):\n    return frozenset(word[1:])\n",
     "assert letters('abc') == frozenset({'a', 'b', 'c'})", "failed", "drops the first letter: {'b', 'c'}"),
    ("set_vs_list_literal", "def unique(xs):\n    return set(xs)\n", "assert unique([3, 1, 3]) == [1, 3]", "failed",
     "a set never equals a list"),
    ("list_vs_tuple", "def pair(a, b):\n    return [a, b]\n", "assert pair(1, 2) == (1, 2)", "failed",
     "a list never equals a tuple"),
    ("str_vs_int", "def count_digits(n):\n    return str(len(str(n)))\n", "assert count_digits(123) == 3", "failed",
     "'3' != 3"),
    ("generator_one_too_many", src("""
        def evens_below(n):
            i = 0
            while i <= n:
                yield i
                i += 2
        """), "assert list(evens_below(6)) == [0, 2, 4]", "failed", "`<=` yields 6 too"),
    ("exception_in_function", "def mean(xs):\n    return sum(xs) / len(xs)\n", "assert mean([]) == 0", "error",
     "ZeroDivisionError on an empty list"),
    ("recursion_without_base_case", "def factorial(n):\n    return n * factorial(n - 1)\n",
     "assert factorial(3) == 6", "error", "RecursionError"),
    ("recursion_wrong_base_case", "def factorial(n):\n    return 0 if n == 0 else n * factorial(n - 1)\n",
     "assert factorial(5) == 120", "failed", "0! returned as 0 makes every product 0"),
    ("missing_return", "def double(x):\n    x * 2\n", "assert double(2) == 4", "failed", "returns None"),
    ("early_return_too_early", src("""
        def first_negative(xs):
            for x in xs:
                if x < 0:
                    return x
                else:
                    return None
        """), "assert first_negative([3, -1, -5]) == -1", "failed", "returns None after the first element"),
    ("assert_not_fails", src("""
        def is_prime(n):
            return all(n % d for d in range(2, int(n ** 0.5) + 1))
        """), "assert is_prime(7)\nassert not is_prime(1)", "failed", "1 is reported prime"),
    ("and_chain_second_fails", "def is_leap(y):\n    return y % 4 == 0\n",
     "assert is_leap(2000) and not is_leap(1900)", "failed", "ignores the century rule"),
    ("string_capitalize_not_title", "def title_case(s):\n    return s.capitalize()\n",
     "assert title_case('hello world') == 'Hello World'", "failed", "capitalize() only upper-cases the first word"),
    ("sorted_wrong_key", "def by_length(words):\n    return sorted(words)\n",
     "assert by_length(['ccc', 'b', 'aa']) == ['b', 'aa', 'ccc']", "failed", "alphabetical, not by length"),
    ("isclose_population_stdev", "import statistics\n\ndef sample_std(xs):\n    return statistics.pstdev(xs)\n",
     "import math\nassert math.isclose(sample_std([2, 4, 4, 4, 5, 5, 7, 9]), 2.138089935299395, rel_tol=1e-9)",
     "failed", "population stdev 2.0, not the sample's"),
    ("stack_pops_from_front", src("""
        class Stack:
            def __init__(self):
                self.items = []

            def push(self, x):
                self.items.append(x)

            def pop(self):
                return self.items.pop(0)

            def peek(self):
                return self.items[0]

            def is_empty(self):
                return not self.items
        """), STACK_TESTS, "failed", "a queue: the first pop gives 1, not 2"),
    ("bank_account_allows_overdraft", src("""
        class Account:
            def __init__(self, balance=0):
                self._balance = balance

            def deposit(self, amount):
                self._balance += amount

            def withdraw(self, amount):
                self._balance -= amount
                return True

            def balance(self):
                return self._balance
        """), ACCOUNT_TESTS, "failed", "withdraw(500) goes through"),
    ("lru_evicts_most_recent", src("""
        class LRUCache:
            def __init__(self, capacity):
                self.capacity = capacity
                self.data = {}

            def get(self, key):
                return self.data.get(key, -1)

            def put(self, key, value):
                if len(self.data) >= self.capacity:
                    self.data.pop(next(iter(self.data)))
                self.data[key] = value
        """), LRU_TESTS, "failed", "FIFO eviction ignores the get('a'): 'a' is evicted, not 'b'"),
    ("error_in_test_setup", "class Counter:\n    def __init__(self, start):\n        self.n = start\n",
     COUNTER_CLASS_TESTS, "error", "Counter() raises TypeError in the test's setup"),
    ("misspelled_function", "def char_frequencies(s):\n    return {c: s.count(c) for c in s}\n",
     "assert char_frequency('aab') == {'a': 2, 'b': 1}", "error", "NameError: char_frequency is not defined"),
    ("syntax_error", "def add(a, b)\n    return a + b\n", "assert add(1, 2) == 3", "error",
     "the solution does not compile"),
    ("key_error", "def price(item):\n    return {'apple': 1}[item]\n", "assert price('pear') == 0", "error",
     "KeyError for an unknown item"),
]

HANGING = [
    ("infinite_loop", "def wait():\n    while True:\n        pass\n", "assert wait() == None", "timeout",
     "never returns"),
    ("loop_never_meets_its_end", src("""
        def halve_to_zero(n):
            while n != 0:
                n -= 2
            return n
        """), "assert halve_to_zero(7) == 0", "timeout", "an odd n steps past 0 forever"),
    ("infinite_loop_in_setup", src("""
        class Counter:
            def __init__(self):
                self.n = 0

            def inc(self):
                while True:
                    self.n += 1

            def get(self):
                return self.n
        """), COUNTER_CLASS_TESTS, "timeout", "inc() called by the test's setup never returns"),
]

# Result types a WRONG row returns that the grader must name: "unsupported result type" and the type.
UNSUPPORTED = {
    "dataclass_result": "InventoryItem",
    "plain_enum_result": "TrafficLight",
    "counter_subclass_eq_true": "AgreeableCounter",
    "list_subclass_eq_true": "AlwaysEqualList",
}

# Rows whose expected verdict is not plain Python's (`exec(solution); exec(tests)`), and why.
NOT_PLAIN_PYTHON = {
    "deque_last_n": "the grader compares a deque with a list literal as a list; Python says deque != list",
    "deque_rotate": "the grader compares a deque with a list literal as a list; Python says deque != list",
    "deep_directory_tree": "run here it would dig its tree in the test process's own working directory",
    "dataclass_result": "plain Python compares the dataclass with the tuple (False); the grader refuses the type",
    "plain_enum_result": "plain Python compares the Enum member with 2 (False); the grader refuses the type",
    "counter_subclass_eq_true": "plain Python believes the forged __eq__; the grader refuses the type",
    "list_subclass_eq_true": "plain Python believes the forged __eq__; the grader refuses the type",
}


def _grade(rows, timeout_s: float) -> dict:
    """One run_many call for a whole table. Should it raise (one solution's leftovers breaking the batch), every
    row of the table errors with one short line, not a thousand-frame traceback per row."""
    try:
        results = run_many([(solution, tests) for _, solution, tests, _, _ in rows], max_workers=2,
                           timeout_s=timeout_s, memory_mb=512)
    except Exception as exc:  # noqa: BLE001 - reported as the table's failure
        raised = f"{type(exc).__name__}: {str(exc)[:300]}"
    else:
        return {row[0]: result for row, result in zip(rows, results)}
    pytest.fail(f"run_many raised {raised} (one row broke the whole batch)", pytrace=False)


@pytest.fixture(scope="module")
def correct_results():
    return _grade(CORRECT, 5.0)


@pytest.fixture(scope="module")
def wrong_results():
    return _grade(WRONG, 5.0)


@pytest.fixture(scope="module")
def hanging_results():
    return _grade(HANGING, 1.0)


def _ids(rows):
    return [row[0] for row in rows]


def test_the_corpus_is_well_formed():
    rows = CORRECT + WRONG + HANGING
    assert len(CORRECT) >= 32 and len(WRONG) >= 32
    assert len(set(_ids(rows))) == len(rows), "row ids must be unique"
    assert all(len(row) == 5 and all(isinstance(part, str) and part for part in row) for row in rows)
    assert {row[3] for row in CORRECT} == {"passed"}
    assert {row[3] for row in WRONG} <= {"failed", "error"} and {row[3] for row in HANGING} == {"timeout"}
    assert set(UNSUPPORTED) <= {row[0] for row in WRONG if row[3] == "error"}
    assert set(NOT_PLAIN_PYTHON) <= set(_ids(rows))
    assert set(STATUSES) >= {row[3] for row in rows}


def _plain_python(solution: str, tests: str) -> str:
    """The verdict of running the row as ordinary Python, tests in written order."""
    namespace: dict = {"__name__": "__corpus__"}
    try:
        exec(compile(solution, "<solution>", "exec"), namespace)  # noqa: S102 - the corpus's own rows
        exec(compile(tests, "<tests>", "exec"), namespace)  # noqa: S102
    except AssertionError:
        return "failed"
    except Exception:  # noqa: BLE001 - any other exception is an error verdict
        return "error"
    return "passed"


@pytest.mark.parametrize("row", [row for row in CORRECT + WRONG if row[0] not in NOT_PLAIN_PYTHON], ids=lambda r: r[0])
def test_rows_agree_with_plain_python(row):
    """The labels are Python's own: a corpus row the grader gets right is one Python gets right too."""
    name, solution, tests, expected, reason = row
    assert _plain_python(solution, tests) == expected, (name, reason)


@pytest.mark.parametrize("row", CORRECT, ids=_ids(CORRECT))
def test_correct_solution_is_passed(correct_results, row):
    name, _, _, expected, reason = row
    result = correct_results[name]
    assert result.passed and result.status == expected, (name, reason, result.status, result.detail)


@pytest.mark.parametrize("row", WRONG, ids=_ids(WRONG))
def test_wrong_solution_gets_its_verdict(wrong_results, row):
    name, _, _, expected, reason = row
    result = wrong_results[name]
    assert not result.passed and result.status == expected, (name, reason, result.status, result.detail)
    if name in UNSUPPORTED:
        assert "unsupported result type" in result.detail and UNSUPPORTED[name] in result.detail, result.detail


@pytest.mark.parametrize("row", HANGING, ids=_ids(HANGING))
def test_hanging_solution_times_out(hanging_results, row):
    name, _, _, expected, reason = row
    result = hanging_results[name]
    assert not result.passed and result.status == expected, (name, reason, result.status, result.detail)
