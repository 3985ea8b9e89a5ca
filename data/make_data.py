"""
Generate the demo data sets: procedural math and code problems at graded difficulty.

    python data/make_data.py                  # rewrites data/{math,code}_{train,test}.jsonl
    python data/make_data.py --out /tmp/d     # somewhere else (the tests regenerate and compare)

Everything is drawn from seeded random generators, so the files are byte-for-byte reproducible
and anyone can regenerate or enlarge them (stdlib only). Why procedural data: the embedded default
model (SmolLM2-135M-Instruct) is tiny, so the demo needs problems it can learn on in minutes, with
a spread of difficulty. SRPO's history resampling only has something to do when some prompts are
always solved (level 1: "What is 2 + 3?") and some are rarely solved (level 6 / code level 5).

Math levels (answers are canonical strings that math-verify compares: "42", "-7", "3/4", "12.5"):
  1 single-digit addition / subtraction        4 one-step word problems
  2 two-digit addition / subtraction           5 multi-step word problems (2-3 operations)
  3 times tables, small mixed expressions      6 fractions, percentages, decimals (exact answers)
Code levels (a Python function with a stated signature, checked by the cases in "tests"):
  1 one-liners (map a list, max with a default)  4 primes, rotations, bases, bracket matching
  2 one small loop (count, filtered sums)        5 dynamic programming, intervals, roman numerals
  3 fizzbuzz, palindromes, run-length encoding

Rows (the training loop validates exactly these fields):
  math: {"id", "domain": "math", "question", "answer", "level"}
  code: {"id", "domain": "code", "question", "tests", "solution", "level"}
A code row's "tests" is in the case form that sandbox.py reads (sandbox.parse_cases): one case per
line, `CALL == LITERAL`, where CALL calls the function and LITERAL is the expected value as a
Python literal (its repr), e.g.
    fizzbuzz(3) == ['1', 'Zap', '3']
    is_divisible(0) == True
Only the calls run in the sandbox; the expected values stay with the trainer, which compares each
result with them, exact types included (True is not 1): a program can neither read what it is
checked against nor skip the check, as it could skip asserts. No row's tests pass a trivial
program (testcheck.TRIVIAL: every answer 0, its first argument, ...): where the drawn inputs would
let one through, the template's fixed `extra` inputs are added. The code "solution" is for
validation only (tests/test_data.py runs it against "tests"); the policy never sees it. Train and
test splits share no question: each level draws a pool of distinct problems and the test split
takes the first few.
"""
import argparse
import ast
import json
import math
import os
import random
import sys
import textwrap
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

SEED = 1234
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from testcheck import TRIVIAL  # noqa: E402  (the trivial programs no row's tests may pass)

# -----------------------------------------------------------------------------
# Small helpers shared by both domains.

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Kara",
         "Leo", "Mia", "Noah", "Olive", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor",
         "Wes", "Zoe"]
PRONOUN = {n: ("she" if n in {"Ava", "Chloe", "Emma", "Grace", "Ivy", "Kara", "Mia", "Olive",
                               "Rosa", "Tara", "Uma", "Zoe"} else "he") for n in NAMES}
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "cards",
         "shells", "balloons", "oranges", "coins"]


def fmt_number(x: Fraction) -> str:
    """Canonical string of an exact number: '42', '-7', '12.5' if it terminates, else '3/4'."""
    if x.denominator == 1:
        return str(x.numerator)
    # A fraction has a finite decimal expansion iff its denominator has only the prime factors 2, 5.
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return f"{x.numerator}/{x.denominator}"
    places = 0
    while (x * 10 ** places).denominator != 1:
        places += 1
    scaled = abs(x.numerator * 10 ** places // x.denominator)
    digits = str(scaled).rjust(places + 1, "0")
    sign = "-" if x < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def fmt_fraction(x: Fraction) -> str:
    """'p/q' in lowest terms (Fraction keeps it reduced), or an integer if q == 1."""
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def split_counts(total: int, n_levels: int) -> list[int]:
    """Spread `total` rows evenly over the levels, the remainder going to the easiest ones."""
    return [total // n_levels + (1 if i < total % n_levels else 0) for i in range(n_levels)]


# -----------------------------------------------------------------------------
# Math: one generator per level, each (rng) -> (question, answer). Arithmetic questions (levels
# 1-3 and the arithmetic half of level 6) always read "<verb> <expression><? or .>" so the tests
# can re-derive the answer from the question text alone.

ASK = ["What is {}?", "Compute {}.", "Calculate {}.", "Evaluate {}."]


def math_level1(rng):
    # Single-digit + and -, never negative: the default model gets most of these right at once.
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        expr, value = f"{a} + {b}", a + b
    else:
        a, b = max(a, b), min(a, b)
        expr, value = f"{a} - {b}", a - b
    return rng.choice(ASK).format(expr), str(value)


def math_level2(rng):
    # Two-digit + and -; a quarter of the subtractions come out negative.
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        expr, value = f"{a} + {b}", a + b
    else:
        if rng.random() < 0.75:
            a, b = max(a, b), min(a, b)
        expr, value = f"{a} - {b}", a - b
    return rng.choice(ASK).format(expr), str(value)


def math_level3(rng):
    # Times tables, exact division and three-operand expressions where precedence matters.
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
    form = rng.randrange(6)
    if form == 0:
        expr, value = f"{a} * {b}", a * b
    elif form == 1:
        expr, value = f"{a * b} / {a}", b
    elif form == 2:
        expr, value = f"{a} + {b} * {c}", a + b * c
    elif form == 3:
        expr, value = f"{a} * {b} - {c}", a * b - c
    elif form == 4:
        expr, value = f"({a} + {b}) * {c}", (a + b) * c
    else:
        d = rng.randint(2, 9)
        expr, value = f"{a} + {b} - {c} + {d}", a + b - c + d
    return rng.choice(ASK).format(expr), str(value)


def math_level4(rng):
    # One-step word problems: the arithmetic of levels 1-3 wrapped in a sentence.
    name, other = rng.sample(NAMES, 2)
    he, item = PRONOUN[name], rng.choice(ITEMS)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    form = rng.randrange(6)
    if form == 0:
        return (f"{name} has {a} {item}. {he.capitalize()} gets {b} more. "
                f"How many {item} does {name} have now?", str(a + b))
    if form == 1:
        a, b = max(a, b) + 1, min(a, b)
        return (f"{name} had {a} {item} and gave {b} of them to {other}. "
                f"How many {item} does {name} have left?", str(a - b))
    if form == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"There are {a} boxes with {b} {item} in each box. "
                f"How many {item} are there in total?", str(a * b))
    if form == 3:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        return (f"{name} shares {a * b} {item} equally among {a} friends. "
                f"How many {item} does each friend get?", str(b))
    if form == 4:
        a, b = max(a, b) + 1, min(a, b)
        return (f"{name} has {a} {item} and {other} has {b} {item}. "
                f"How many more {item} does {name} have than {other}?", str(a - b))
    a, b = rng.randint(2, 15), rng.randint(2, 9)
    return f"A pen costs {a} dollars. How many dollars do {b} pens cost?", str(a * b)


def math_level5(rng):
    # Multi-step word problems: two or three operations, every intermediate a whole number.
    name = rng.choice(NAMES)
    he, item = PRONOUN[name], rng.choice(ITEMS)
    He = he.capitalize()
    his = "her" if he == "she" else "his"
    form = rng.randrange(7)
    if form == 0:
        a, b = rng.randint(3, 9), rng.randint(4, 12)
        c = rng.randint(1, a * b - 1)
        return (f"{name} buys {a} packs of {item} with {b} {item} in each pack, then gives away "
                f"{c} {item}. How many {item} does {name} have left?", str(a * b - c))
    if form == 1:
        a, b, c = rng.randint(8, 25), rng.randint(2, 8), rng.randint(2, 8)
        return (f"{name} earns {a} dollars per hour. {He} works {b} hours on Monday and {c} hours "
                f"on Tuesday. How many dollars does {he} earn in total?", str(a * (b + c)))
    if form == 2:
        a = rng.randint(40, 120)
        b, c = rng.randint(5, a // 3), rng.randint(5, a // 3)
        d = rng.randint(5, 40)
        return (f"A shop has {a} {item}. It sells {b} in the morning and {c} in the afternoon, "
                f"then receives a delivery of {d} more. How many {item} does the shop have now?",
                str(a - b - c + d))
    if form == 3:
        b, c = rng.randint(2, 9), rng.randint(2, 9)
        a = b * c + rng.randint(1, 30)
        return (f"{name} has {a} dollars. {He} buys {b} notebooks that cost {c} dollars each. "
                f"How many dollars does {name} have left?", str(a - b * c))
    if form == 4:
        g, k = rng.randint(2, 6), rng.randint(2, 9)
        n = g * rng.randint(3, 9)
        return (f"A class of {n} students is split into groups of {g}. Each group gets {k} markers. "
                f"How many markers are handed out?", str(n // g * k))
    if form == 5:
        a, b, c = rng.randint(5, 30), rng.randint(2, 9), rng.randint(1, 20)
        return (f"{name} reads {a} pages a day for {b} days, and then {c} more pages. "
                f"How many pages does {he} read in total?", str(a * b + c))
    a, b = rng.randint(6, 20), rng.randint(2, 9)
    c, d = rng.randint(1, 5), rng.randint(1, 5)
    return (f"Tickets cost {a} dollars for adults and {b} dollars for children. {name} buys {c} "
            f"adult tickets and {d} child tickets for {his} family. How many dollars does {he} "
            f"spend?", str(a * c + b * d))


def math_level6(rng):
    # Fractions, percentages and decimals: exact answers, but the default model rarely gets them.
    form = rng.randrange(7)
    if form == 0:
        # a/b (+ or -) c/d, answered as a reduced fraction (never a whole number).
        while True:
            b, d = rng.randint(2, 12), rng.randint(2, 12)
            a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
            op = rng.choice("+-")
            value = Fraction(a, b) + Fraction(c, d) if op == "+" else Fraction(a, b) - Fraction(c, d)
            if value.denominator != 1:
                break
        q = f"What is {a}/{b} {op} {c}/{d}? Give the answer as a fraction in lowest terms."
        return q, fmt_fraction(value)
    if form == 1:
        pct = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 60, 75])
        n = rng.randint(2, 40) * 20  # a multiple of 20 keeps every listed percentage exact
        return f"What is {pct}% of {n}?", fmt_number(Fraction(pct * n, 100))
    if form == 2:
        a = Fraction(rng.choice([n for n in range(11, 100) if n % 10]), 10)  # a real decimal: 2.3, not 2.0
        b = rng.randint(2, 9)
        return rng.choice(ASK).format(f"{fmt_number(a)} * {b}"), fmt_number(a * b)
    if form == 3:
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        return rng.choice(ASK).format(f"{a} * {b}"), str(a * b)
    if form == 4:
        price = rng.randint(2, 30) * 4
        pct = rng.choice([10, 20, 25, 50, 75])
        item = rng.choice(["jacket", "lamp", "backpack", "chair", "watch", "game"])
        return (f"A {item} costs {price} dollars and is on sale for {pct}% off. "
                f"What is the sale price in dollars?", fmt_number(Fraction(price * (100 - pct), 100)))
    if form == 5:
        scores = [rng.randint(60, 100) for _ in range(4)]
        listed = ", ".join(map(str, scores[:-1])) + f" and {scores[-1]}"
        return (f"{rng.choice(NAMES)} scored {listed} on four tests. What is the average score?",
                fmt_number(Fraction(sum(scores), 4)))
    name = rng.choice(NAMES)
    den = rng.choice([3, 4, 5, 6, 8])
    num = rng.randint(1, den - 1)
    total = den * rng.randint(2, 15)
    return (f"{name} has {total} dollars and spends {num}/{den} of it. "
            f"How many dollars does {name} have left?", fmt_number(total - Fraction(num * total, den)))


MATH_LEVELS = [math_level1, math_level2, math_level3, math_level4, math_level5, math_level6]

# -----------------------------------------------------------------------------
# Code: one template per problem family, each (rng) -> CodeTask. A template writes the solution
# as source text *and* gives an independent reference `ref` (usually a different idiom, for the
# hard ones a brute force), and the generator checks they agree on every test input. The expected
# values in the cases come from `ref`, so a slip in either one stops generation.


@dataclass
class CodeTask:
    signature: str       # "add_all(xs)": the exact call the statement names
    spec: str            # what it must do, completing "Write a Python function `sig` that ..."
    solution: str        # canonical solution source (used only for validation)
    ref: Callable        # independent reference implementation that produces expected outputs
    inputs: list         # argument tuples; the first is shown as the example
    # Argument tuples added, in order and only as many as needed, when the drawn inputs let a
    # trivial program pass (every answer 0, say). Fixed, not drawn: the random stream, and so
    # every other row, stays as it was.
    extra: list = field(default_factory=list)


def rand_list(rng, lo=-20, hi=20, n_lo=1, n_hi=7):
    return [rng.randint(lo, hi) for _ in range(rng.randint(n_lo, n_hi))]


def rand_word(rng, alphabet="abcdefghijklmnopqrstuvwxyz", n_lo=1, n_hi=8):
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(n_lo, n_hi)))


def lists(rng, k, edge=([],), **kw):
    """k random one-list argument tuples plus the edge cases (put last, so the example is random)."""
    return [(rand_list(rng, **kw),) for _ in range(k)] + [(e,) for e in edge]


def strings(rng, k, edge=("",), **kw):
    return [(rand_word(rng, **kw),) for _ in range(k)] + [(e,) for e in edge]


def src(text: str) -> str:
    """Dedent a solution written (indented, after a newline) inside an f-string; end with one newline."""
    return textwrap.dedent(text).strip("\n") + "\n"


# --- level 1: one-liners ---

def c_map_const(rng):
    k = rng.randint(2, 20)
    op, name, words, expr = rng.choice([
        ("+", "add_all", f"{k} added to each element of `xs`", f"x + {k}"),
        ("-", "subtract_all", f"{k} subtracted from each element of `xs`", f"x - {k}"),
        ("*", "multiply_all", f"each element of `xs` multiplied by {k}", f"x * {k}")])
    ops = {"+": lambda x: x + k, "-": lambda x: x - k, "*": lambda x: x * k}
    return CodeTask(f"{name}(xs)", f"takes a list of integers `xs` and returns a new list with {words}.",
                    src(f"""
                        def {name}(xs):
                            return [{expr} for x in xs]"""),
                    lambda xs: list(map(ops[op], xs)), lists(rng, 4))


def c_extreme_or_default(rng):
    d = rng.randint(-9, 9)
    name, fn = rng.choice([("largest", "max"), ("smallest", "min")])
    pick = (lambda xs: sorted(xs)[-1]) if fn == "max" else (lambda xs: sorted(xs)[0])
    return CodeTask(f"{name}(xs)", f"returns the {name} element of the list `xs`, or {d} if `xs` is empty.",
                    src(f"""
                        def {name}(xs):
                            return {fn}(xs) if xs else {d}"""),
                    lambda xs: pick(xs) if len(xs) > 0 else d, lists(rng, 4))


def c_linear(rng):
    a, b = rng.randint(2, 9), rng.choice([i for i in range(-9, 10) if i != 0])
    formula = f"{a} * x {'+' if b > 0 else '-'} {abs(b)}"
    return CodeTask("linear(x)", f"returns `{formula}` for an integer `x`.",
                    src(f"""
                        def linear(x):
                            return {formula}"""),
                    lambda x: sum([x] * a) + b, [(rng.randint(-50, 50),) for _ in range(4)] + [(0,)])


def c_repeat(rng):
    k = rng.randint(2, 9)
    sep = rng.choice(["", "-", ",", " ", "+", "/"])
    how = "with nothing between the copies" if sep == "" else f"with {sep!r} between the copies"
    return CodeTask("repeat(s)", f"returns the string `s` repeated {k} times, {how}.",
                    src(f"""
                        def repeat(s):
                            return {sep!r}.join([s] * {k})"""),
                    lambda s: (s + sep) * (k - 1) + s, strings(rng, 3, n_hi=4))


def c_divisible(rng):
    k = rng.randint(2, 15)
    return CodeTask("is_divisible(n)", f"returns True if the integer `n` is divisible by {k}, otherwise False.",
                    src(f"""
                        def is_divisible(n):
                            return n % {k} == 0"""),
                    lambda n: n // k * k == n,
                    [(k * rng.randint(1, 20),), (k * rng.randint(1, 20) + 1,), (0,), (-k,), (k - 1,)])


def c_count_char(rng):
    c = rng.choice("abcdefghijklmnopqrstuvwxyz")
    alphabet = c * 3 + "".join(rng.sample("abcdefghijklmnopqrstuvwxyz", 4))
    return CodeTask("count_char(s)", f"returns how many times the character {c!r} appears in the string `s`.",
                    src(f"""
                        def count_char(s):
                            return s.count({c!r})"""),
                    lambda s: sum(1 for ch in s if ch == c), strings(rng, 4, alphabet=alphabet))


def c_reverse(rng):
    how, call = rng.choice([("", ""), (", converted to upper case", ".upper()"),
                            (", converted to lower case", ".lower()")])
    conv = {"": str, ".upper()": str.upper, ".lower()": str.lower}[call]
    return CodeTask("reverse_string(s)", f"returns the string `s` reversed{how}.",
                    src(f"""
                        def reverse_string(s):
                            return s[::-1]{call}"""),
                    lambda s: conv("".join(reversed(s))),
                    strings(rng, 3, alphabet="abcdeXYZ", edge=("", "Ab")))


def c_take(rng):
    k = rng.randint(1, 5)
    end, sl = rng.choice([("first", f"[:{k}]"), ("last", f"[-{k}:]")])
    take = (lambda xs: xs[:k]) if end == "first" else (lambda xs: xs[max(len(xs) - k, 0):])
    return CodeTask(f"{end}_{k}(xs)", f"returns a list of the {end} {k} elements of the list `xs` "
                    "(all of them if it has fewer).",
                    src(f"""
                        def {end}_{k}(xs):
                            return xs{sl}"""),
                    take, lists(rng, 3, n_hi=9, edge=([], list(range(10, 11 + k)))))  # one longer than k


# --- level 2: a small loop ---

def c_sum_multiples(rng):
    k = rng.randint(2, 9)
    return CodeTask("sum_multiples(xs)", f"returns the sum of the elements of the list `xs` that are divisible by {k}.",
                    src(f"""
                        def sum_multiples(xs):
                            total = 0
                            for x in xs:
                                if x % {k} == 0:
                                    total += x
                            return total"""),
                    lambda xs: sum(filter(lambda x: x % k == 0, xs)), lists(rng, 4, n_hi=10),
                    extra=[([k, k, 1],)])  # 2k: not 0, 1, -1, its length 3 or its sum 2k + 1


def c_count_compare(rng):
    k = rng.randint(-5, 20)
    name, word, cmp = rng.choice([("count_greater", "greater than", ">"), ("count_less", "less than", "<")])
    test = (lambda x: x > k) if cmp == ">" else (lambda x: x < k)
    return CodeTask(f"{name}(xs)", f"returns how many elements of the list `xs` are {word} {k}.",
                    src(f"""
                        def {name}(xs):
                            count = 0
                            for x in xs:
                                if x {cmp} {k}:
                                    count += 1
                            return count"""),
                    lambda xs: len([x for x in xs if test(x)]), lists(rng, 4, n_hi=10),
                    # 2: not 0, 1, -1, its length 3 or its sum 3k +- 3
                    extra=[([k + 1, k + 2, k] if cmp == ">" else [k - 1, k - 2, k],)])


def c_count_letters(rng):
    letters = "aeiou" if rng.random() < 0.3 else "".join(sorted(rng.sample("bcdfghklmnprst", 3)))
    what = "vowels (a, e, i, o, u)" if letters == "aeiou" else f"letters {', '.join(letters)}"
    return CodeTask("count_letters(s)", f"returns how many characters of the string `s` are one of the "
                    f"{what}, ignoring case.",
                    src(f"""
                        def count_letters(s):
                            count = 0
                            for ch in s.lower():
                                if ch in {letters!r}:
                                    count += 1
                            return count"""),
                    lambda s: sum(s.lower().count(c) for c in letters),
                    strings(rng, 4, alphabet=letters.upper() + letters + "xyzq ", n_hi=12))


def c_digits(rng):
    form = rng.randrange(3)
    if form == 0:
        spec, name, body, ref = ("returns the sum of the decimal digits of the non-negative integer `n`.",
                                 "digit_sum", "total += n % 10", lambda n: sum(map(int, str(n))))
        init = 0
    elif form == 1:
        spec, name, body, ref = ("returns the product of the decimal digits of the non-negative integer `n`.",
                                 "digit_product", "total *= n % 10", lambda n: math.prod(map(int, str(n))))
        init = 1
    else:
        d = rng.randint(0, 9)
        spec, name, body, ref = (f"returns how many times the digit {d} appears in the decimal digits of the "
                                 "non-negative integer `n`.", f"count_{d}s", f"total += n % 10 == {d}",
                                 lambda n: str(n).count(str(d)))
        init = 0
    # 1dd has the digit d two or three times: not 0, 1, -1 or itself.
    extra = [(int(f"1{d}{d}"),)] if form == 2 else []
    # The loop handles n = 0 as one digit "0", like str(n) does.
    return CodeTask(f"{name}(n)", spec,
                    src(f"""
                        def {name}(n):
                            total = {init}
                            while True:
                                {body}
                                n //= 10
                                if n == 0:
                                    return total"""),
                    ref, [(rng.randint(10, 99999),) for _ in range(4)] + [(0,), (7,)], extra)


def c_sum_range(rng):
    if rng.random() < 0.5:
        p = rng.randint(1, 4)
        spec, term, cond = f"returns the sum of `i ** {p}` for every integer i from 1 to `n` inclusive.", f"i ** {p}", "True"
        ref = lambda n: sum(pow(i, p) for i in range(n, 0, -1))  # noqa: E731
    else:
        k = rng.randint(2, 9)
        spec, term, cond = f"returns the sum of the multiples of {k} from 1 to `n` inclusive.", "i", f"i % {k} == 0"
        ref = lambda n: sum(range(k, n + 1, k))  # noqa: E731
    return CodeTask("sum_range(n)", spec,
                    src(f"""
                        def sum_range(n):
                            total = 0
                            for i in range(1, n + 1):
                                if {cond}:
                                    total += {term}
                            return total"""),
                    ref, [(rng.randint(2, 30),) for _ in range(4)] + [(0,), (1,)])


def c_first_index(rng):
    k = rng.randint(-5, 15)
    return CodeTask("first_index(xs)", f"returns the index of the first element of the list `xs` that is "
                    f"greater than {k}, or -1 if there is none.",
                    src(f"""
                        def first_index(xs):
                            for i, x in enumerate(xs):
                                if x > {k}:
                                    return i
                            return -1"""),
                    lambda xs: next((i for i in range(len(xs)) if xs[i] > k), -1),
                    lists(rng, 4, n_hi=8, edge=([], [k])),
                    extra=[([k, k, k + 1],)])  # 2: not 0, 1, -1, its length 3 or its sum 3k + 1


def c_long_words(rng):
    k = rng.randint(2, 6)
    return CodeTask("count_long_words(s)", f"returns how many words in the string `s` (words are separated by "
                    f"spaces) have more than {k} letters.",
                    src(f"""
                        def count_long_words(s):
                            count = 0
                            for word in s.split():
                                if len(word) > {k}:
                                    count += 1
                            return count"""),
                    lambda s: sum(len(w) > k for w in s.split(" ") if w),
                    [(" ".join(rand_word(rng, n_hi=9) for _ in range(rng.randint(1, 6))),) for _ in range(4)]
                    + [("",)])


# --- level 3: a loop with some bookkeeping ---

def c_fizzbuzz(rng):
    a, b = sorted(rng.sample(range(2, 8), 2))
    wa, wb = rng.sample(["Fizz", "Buzz", "Bang", "Pop", "Zap", "Ding", "Boom"], 2)
    return CodeTask("fizzbuzz(n)", f"returns a list of strings for the numbers 1 to `n`: '{wa}{wb}' for "
                    f"multiples of both {a} and {b}, '{wa}' for other multiples of {a}, '{wb}' for other "
                    f"multiples of {b}, and the number itself (as a string) otherwise.",
                    src(f"""
                        def fizzbuzz(n):
                            out = []
                            for i in range(1, n + 1):
                                if i % {a} == 0 and i % {b} == 0:
                                    out.append({wa + wb!r})
                                elif i % {a} == 0:
                                    out.append({wa!r})
                                elif i % {b} == 0:
                                    out.append({wb!r})
                                else:
                                    out.append(str(i))
                            return out"""),
                    lambda n: [(wa if i % a == 0 else "") + (wb if i % b == 0 else "") or str(i)
                               for i in range(1, n + 1)],
                    [(rng.randint(a * b, 2 * a * b),), (1,), (0,), (b,)])


def c_palindrome(rng):
    name = rng.choice(["is_palindrome", "palindrome", "check_palindrome"])
    cases = ["A man, a plan, a canal: Panama", "race a car", "No 'x' in Nixon", "ab", "", "Was it a car?"]
    return CodeTask(f"{name}(s)", "returns True if the string `s` reads the same forwards and backwards when "
                    "case is ignored and every character that is not a letter or digit is skipped, else False.",
                    src(f"""
                        def {name}(s):
                            chars = [c.lower() for c in s if c.isalnum()]
                            return chars == chars[::-1]"""),
                    lambda s: (lambda t: all(t[i] == t[-1 - i] for i in range(len(t))))(
                        "".join(filter(str.isalnum, s)).lower()),
                    [(rand_word(rng, alphabet="abA ,", n_hi=6),)] + [(c,) for c in cases])


def c_rle(rng):
    count_first = rng.random() < 0.5
    skip_one = rng.random() < 0.5
    example = ("3a" if count_first else "a3") + ("b" if skip_one else ("1b" if count_first else "b1"))
    extra = " A run of length 1 is written as the character alone." if skip_one else ""
    piece = "(str(n) if n > 1 else '')" if skip_one else "str(n)"
    part = f"{piece} + c" if count_first else f"c + {piece}"

    def ref(s):
        out, i = "", 0
        while i < len(s):
            j = i
            while j < len(s) and s[j] == s[i]:
                j += 1
            n = "" if skip_one and j - i == 1 else str(j - i)
            out += n + s[i] if count_first else s[i] + n
            i = j
        return out
    return CodeTask("rle(s)", f"run-length encodes the string `s`: each run of a repeated character becomes "
                    f"{'its length followed by the character' if count_first else 'the character followed by its length'}, "
                    f"so 'aaab' becomes '{example}'.{extra}",
                    src(f"""
                        def rle(s):
                            out = []
                            i = 0
                            while i < len(s):
                                c, n = s[i], 1
                                while i + n < len(s) and s[i + n] == c:
                                    n += 1
                                out.append({part})
                                i += n
                            return ''.join(out)"""),
                    ref, strings(rng, 3, alphabet="aaabbbccd", n_hi=10, edge=("", "z", "aaab")))


def c_dedupe(rng):
    form = rng.randrange(3)
    if form == 0:
        spec = "with duplicates removed, keeping the first occurrence of each value, in order."
        body = """seen = set()
                            out = []
                            for x in xs:
                                if x not in seen:
                                    seen.add(x)
                                    out.append(x)
                            return out"""
        ref = lambda xs: list(dict.fromkeys(xs))  # noqa: E731
    elif form == 1:
        spec = "with duplicates removed, keeping the last occurrence of each value, in order."
        body = """out = []
                            for i, x in enumerate(xs):
                                if x not in xs[i + 1:]:
                                    out.append(x)
                            return out"""
        ref = lambda xs: list(reversed(list(dict.fromkeys(reversed(xs)))))  # noqa: E731
    else:
        spec = "that contains only the values that occur exactly once in `xs`, in order."
        body = """out = []
                            for x in xs:
                                if xs.count(x) == 1:
                                    out.append(x)
                            return out"""
        ref = lambda xs: [x for x in xs if sum(y == x for y in xs) == 1]  # noqa: E731
    return CodeTask("dedupe(xs)", f"returns a new list of the elements of the list `xs` {spec}",
                    src(f"""
                        def dedupe(xs):
                            {body}"""),
                    ref, lists(rng, 4, lo=0, hi=6, n_hi=10))


def c_running(rng):
    k = rng.randint(-5, 10)
    return CodeTask("running_total(xs)", f"returns the running totals of the list `xs` starting from {k}: "
                    f"element i of the result is {k} + xs[0] + ... + xs[i].",
                    src(f"""
                        def running_total(xs):
                            out = []
                            total = {k}
                            for x in xs:
                                total += x
                                out.append(total)
                            return out"""),
                    lambda xs: [k + sum(xs[:i + 1]) for i in range(len(xs))], lists(rng, 4))


def c_caesar(rng):
    k = rng.randint(1, 25)
    return CodeTask("shift(s)", f"shifts every lowercase letter of the string `s` forward by {k} places in the "
                    "alphabet, wrapping around from 'z' to 'a', and leaves all other characters unchanged.",
                    src(f"""
                        def shift(s):
                            out = ''
                            for c in s:
                                if 'a' <= c <= 'z':
                                    c = chr((ord(c) - ord('a') + {k}) % 26 + ord('a'))
                                out += c
                            return out"""),
                    lambda s: s.translate(str.maketrans("abcdefghijklmnopqrstuvwxyz",
                                                        "abcdefghijklmnopqrstuvwxyz"[k:] + "abcdefghijklmnopqrstuvwxyz"[:k])),
                    strings(rng, 3, alphabet="abcxyzAZ !", edge=("", "xyz")))


def c_clamp(rng):
    lo = rng.randint(-10, 5)
    hi = lo + rng.randint(2, 15)
    return CodeTask("clamp(xs)", f"returns a new list in which every element of the list `xs` below {lo} is "
                    f"replaced by {lo} and every element above {hi} is replaced by {hi}.",
                    src(f"""
                        def clamp(xs):
                            out = []
                            for x in xs:
                                if x < {lo}:
                                    x = {lo}
                                elif x > {hi}:
                                    x = {hi}
                                out.append(x)
                            return out"""),
                    lambda xs: [sorted([lo, x, hi])[1] for x in xs], lists(rng, 4, lo=-25, hi=25))


# --- level 4: a known algorithm ---

def _is_prime_slow(n):  # the reference: trial division by every smaller number
    return n >= 2 and all(n % d for d in range(2, n))


def c_primes(rng):
    form = rng.randrange(4)
    helper = """
                        def _is_prime(n):
                            if n < 2:
                                return False
                            d = 2
                            while d * d <= n:
                                if n % d == 0:
                                    return False
                                d += 1
                            return True
                        """
    if form == 0:
        name, spec, ret = "is_prime", "returns True if the integer `n` is prime, else False.", "_is_prime(n)"
        ref = _is_prime_slow
    elif form == 1:
        name, spec, ret = "primes_up_to", "returns the list of all primes less than or equal to `n`, in increasing order.", "[p for p in range(2, n + 1) if _is_prime(p)]"
        ref = lambda n: list(filter(_is_prime_slow, range(n + 1)))  # noqa: E731
    elif form == 2:
        name, spec, ret = "count_primes", "returns how many primes are less than or equal to `n`.", "sum(1 for p in range(2, n + 1) if _is_prime(p))"
        ref = lambda n: len(list(filter(_is_prime_slow, range(n + 1))))  # noqa: E731
    else:
        name, spec, ret = "next_prime", "returns the smallest prime strictly greater than `n`.", "next(p for p in range(n + 1, 2 * n + 3) if _is_prime(p))"
        ref = lambda n: next(p for p in range(max(n + 1, 2), 10 ** 6) if _is_prime_slow(p))  # noqa: E731
    return CodeTask(f"{name}(n)", spec,
                    src(f"""{helper}

                        def {name}(n):
                            return {ret}"""),
                    ref, [(rng.randint(2, 60),) for _ in range(3)] + [(0,), (1,), (2,), (97,)])


def c_chunk(rng):
    k = rng.randint(2, 8)
    return CodeTask("chunk(xs)", f"splits the list `xs` into consecutive lists of {k} elements (the last one may be "
                    "shorter) and returns the list of those lists.",
                    src(f"""
                        def chunk(xs):
                            return [xs[i:i + {k}] for i in range(0, len(xs), {k})]"""),
                    lambda xs: [list(t) for t in zip(*[iter(xs)] * k)] + ([xs[len(xs) // k * k:]] if len(xs) % k else []),
                    lists(rng, 3, n_hi=12, edge=([], list(range(k)))))


def c_rotate(rng):
    k = rng.randint(1, 9)
    side = rng.choice(["left", "right"])
    cut = f"{k} % len(xs)" if side == "left" else f"-({k} % len(xs))"

    def ref(xs):
        xs = list(xs)
        for _ in range(k if xs else 0):
            xs = xs[1:] + xs[:1] if side == "left" else xs[-1:] + xs[:-1]
        return xs
    return CodeTask("rotate(xs)", f"returns the list `xs` rotated {side} by {k} positions (the rotation wraps "
                    f"around, so {k} may exceed the length). An empty list stays empty.",
                    src(f"""
                        def rotate(xs):
                            if not xs:
                                return []
                            i = {cut}
                            return xs[i:] + xs[:i]"""),
                    ref, lists(rng, 4, n_hi=8, edge=([], [1, 2, 3])),
                    extra=[(list(range(1, k + 2)),)])  # k + 1 long: rotated by k, it is not itself


def c_second_largest(rng):
    d = rng.randint(-20, 20)
    return CodeTask("second_largest(xs)", f"returns the second largest distinct value in the list `xs`, or {d} if "
                    "it has fewer than two distinct values.",
                    src(f"""
                        def second_largest(xs):
                            values = sorted(set(xs))
                            return values[-2] if len(values) >= 2 else {d}"""),
                    lambda xs: max([x for x in xs if x != max(xs)], default=d) if xs else d,
                    lists(rng, 3, lo=-9, hi=9, edge=([], [5, 5], [3, 9, 9])))


def c_brackets(rng):
    o, c = rng.choice(["()", "[]", "{}"])

    def ref(s):
        t = "".join(ch for ch in s if ch in o + c)
        while o + c in t:
            t = t.replace(o + c, "")
        return t == ""
    cases = [(o + c + o + o + c + c,), (o + c + c + o,), (c,), ("",), ("x" + o + "y" + c,),
             (rand_word(rng, alphabet=o + c + "ab", n_lo=2, n_hi=8),)]
    return CodeTask("balanced(s)", f"returns True if the brackets {o!r} and {c!r} in the string `s` are "
                    "balanced (every opening one is closed later, in properly nested order), else False. "
                    "Other characters are ignored.",
                    src(f"""
                        def balanced(s):
                            depth = 0
                            for ch in s:
                                if ch == {o!r}:
                                    depth += 1
                                elif ch == {c!r}:
                                    depth -= 1
                                    if depth < 0:
                                        return False
                            return depth == 0"""),
                    ref, cases)


def c_to_base(rng):
    b = rng.randint(2, 9)

    def ref(n):
        return str(n) if n < b else ref(n // b) + str(n % b)
    return CodeTask("to_base(n)", f"returns the base-{b} representation of the non-negative integer `n` as a "
                    "string of digits, without leading zeros ('0' for zero).",
                    src(f"""
                        def to_base(n):
                            if n == 0:
                                return '0'
                            digits = ''
                            while n > 0:
                                digits = str(n % {b}) + digits
                                n //= {b}
                            return digits"""),
                    ref, [(rng.randint(b, 500),) for _ in range(3)] + [(0,), (1,), (b,)])


def c_two_sum(rng):
    t = rng.randint(0, 40)

    def ref(xs):
        pairs = [(i, j) for i in range(len(xs)) for j in range(len(xs)) if i < j and xs[i] + xs[j] == t]
        return min(pairs) if pairs else (-1, -1)
    inputs = [(rand_list(rng, lo=-5, hi=t + 5, n_lo=3, n_hi=8),) for _ in range(3)]
    inputs.append(([1, t - 1, 5, 5],))
    inputs.append(([],))
    return CodeTask("pair_sum(xs)", f"returns a tuple (i, j) of indices with i < j and xs[i] + xs[j] == {t}, "
                    "choosing the smallest i and then the smallest j, or (-1, -1) if there is no such pair.",
                    src(f"""
                        def pair_sum(xs):
                            for i in range(len(xs)):
                                for j in range(i + 1, len(xs)):
                                    if xs[i] + xs[j] == {t}:
                                        return (i, j)
                            return (-1, -1)"""),
                    ref, inputs)


def c_kth(rng):
    k = rng.randint(1, 3)
    d = rng.randint(-9, 9)
    side = rng.choice(["smallest", "largest"])
    nth = {1: "", 2: "second ", 3: "third "}[k]
    order = "" if side == "smallest" else ", reverse=True"

    def ref(xs):  # peel off the extreme value k - 1 times
        xs = set(xs)
        pick = min if side == "smallest" else max
        for _ in range(k - 1):
            if xs:
                xs.remove(pick(xs))
        return pick(xs) if xs else d
    return CodeTask(f"kth_{side}(xs)", f"returns the {nth}{side} distinct value in the list `xs` (duplicates count "
                    f"once), or {d} if there are fewer than {k} distinct values.",
                    src(f"""
                        def kth_{side}(xs):
                            values = sorted(set(xs){order})
                            return values[{k - 1}] if len(values) >= {k} else {d}"""),
                    ref, lists(rng, 3, lo=-9, hi=9, n_hi=8, edge=([], [4, 4, 4], [1, 2, 2, 3])))


def c_base_digit_count(rng):
    b = rng.randint(2, 9)
    d = rng.randint(0 if b > 2 else 1, b - 1)

    def ref(n):  # write n out in base b by recursion, then count
        def digits(m):
            return [m] if m < b else digits(m // b) + [m % b]
        return digits(n).count(d)
    return CodeTask("count_digit(n)", f"returns how many times the digit {d} appears when the non-negative integer "
                    f"`n` is written in base {b} (zero is written as the single digit 0).",
                    src(f"""
                        def count_digit(n):
                            count = 0
                            while True:
                                if n % {b} == {d}:
                                    count += 1
                                n //= {b}
                                if n == 0:
                                    return count"""),
                    ref, [(rng.randint(b, 2000),) for _ in range(4)] + [(0,), (b,), (b * b - 1,)])


def c_pair_count(rng):
    t = rng.randint(0, 30)
    return CodeTask("count_pairs(xs)", f"returns how many pairs of positions i < j in the list `xs` have "
                    f"xs[i] + xs[j] == {t}.",
                    src(f"""
                        def count_pairs(xs):
                            seen = {{}}
                            count = 0
                            for x in xs:
                                count += seen.get({t} - x, 0)
                                seen[x] = seen.get(x, 0) + 1
                            return count"""),
                    lambda xs: sum(1 for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[i] + xs[j] == t),
                    lists(rng, 4, lo=-5, hi=t + 5, n_lo=2, n_hi=10, edge=([], [t // 2] * 3)))


# --- level 5: dynamic programming and friends (references are brute force) ---

def c_stairs(rng):
    steps = sorted(rng.sample(range(1, 6), rng.randint(2, 3)))

    def ref(n):  # count sequences of steps by plain recursion
        return 1 if n == 0 else sum(ref(n - s) for s in steps if s <= n)
    listed = ", ".join(map(str, steps[:-1])) + f" or {steps[-1]}"
    return CodeTask("climb_ways(n)", f"returns the number of different ordered ways to climb exactly `n` steps "
                    f"when each move climbs {listed} steps (there is 1 way to climb 0 steps).",
                    src(f"""
                        def climb_ways(n):
                            ways = [1] + [0] * n
                            for i in range(1, n + 1):
                                ways[i] = sum(ways[i - s] for s in {steps!r} if s <= i)
                            return ways[n]"""),
                    ref, [(rng.randint(4, 15),) for _ in range(3)] + [(0,), (1,), (steps[-1],)])


def c_coins(rng):
    coins = sorted(rng.sample(range(2, 13), 3))

    def ref(amount):  # breadth-first search: the first level that reaches 0 is the fewest coins
        frontier, n = {amount}, 0
        while frontier:
            if 0 in frontier:
                return n
            frontier = {a - c for a in frontier for c in coins if a - c >= 0}
            n += 1
        return -1
    return CodeTask("min_coins(amount)", f"returns the fewest coins with values {coins} (as many of each as "
                    "needed) that add up exactly to the non-negative integer `amount`, or -1 if it cannot be "
                    "done.",
                    src(f"""
                        def min_coins(amount):
                            INF = float('inf')
                            best = [0] + [INF] * amount
                            for a in range(1, amount + 1):
                                for c in {coins!r}:
                                    if c <= a and best[a - c] + 1 < best[a]:
                                        best[a] = best[a - c] + 1
                            return best[amount] if best[amount] != INF else -1"""),
                    ref, [(rng.randint(5, 40),) for _ in range(3)] + [(0,), (1,), (coins[0],)])


def c_lis(rng):
    strict = rng.random() < 0.5
    word, cmp = ("strictly increasing", "<") if strict else ("non-decreasing", "<=")

    def ref(xs):  # try every subsequence, longest first (inputs are short)
        from itertools import combinations
        ok = (lambda a, b: a < b) if strict else (lambda a, b: a <= b)
        for r in range(len(xs), 0, -1):
            if any(all(ok(s[i], s[i + 1]) for i in range(r - 1)) for s in combinations(xs, r)):
                return r
        return 0
    return CodeTask("longest_run(xs)", f"returns the length of the longest {word} subsequence of the list `xs` "
                    "(not necessarily contiguous; 0 for an empty list).",
                    src(f"""
                        def longest_run(xs):
                            best = [1] * len(xs)
                            for i in range(len(xs)):
                                for j in range(i):
                                    if xs[j] {cmp} xs[i]:
                                        best[i] = max(best[i], best[j] + 1)
                            return max(best, default=0)"""),
                    ref, lists(rng, 4, lo=0, hi=9, n_lo=3, n_hi=9, edge=([], [2, 2, 2])))


def c_max_window(rng):
    k = rng.randint(2, 5)
    return CodeTask("max_window(xs)", f"returns the largest sum of {k} consecutive elements of the list `xs`, or "
                    f"None if `xs` has fewer than {k} elements.",
                    src(f"""
                        def max_window(xs):
                            if len(xs) < {k}:
                                return None
                            window = sum(xs[:{k}])
                            best = window
                            for i in range({k}, len(xs)):
                                window += xs[i] - xs[i - {k}]
                                best = max(best, window)
                            return best"""),
                    lambda xs: max((sum(xs[i:i + k]) for i in range(len(xs) - k + 1)), default=None),
                    lists(rng, 4, n_lo=k, n_hi=10, edge=(list(range(k)),)))


def c_top_words(rng):
    k = rng.randint(1, 3)

    def ref(s):
        words = s.split()
        return sorted(set(words), key=lambda w: (-words.count(w), w))[:k]
    vocab = rng.sample(["red", "blue", "cat", "dog", "sun", "tree", "map", "cup"], 4)
    inputs = [(" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 10))),) for _ in range(4)] + [("",)]
    return CodeTask("top_words(s)", f"returns a list of the {k} most frequent words in the string `s` (words "
                    "are separated by spaces), most frequent first, ties broken alphabetically; fewer if `s` has "
                    f"fewer than {k} distinct words.",
                    src(f"""
                        def top_words(s):
                            counts = {{}}
                            for w in s.split():
                                counts[w] = counts.get(w, 0) + 1
                            ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                            return [w for w, _ in ranked[:{k}]]"""),
                    ref, inputs)


def c_roman(rng):
    table = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"),
             (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]

    def to_roman(n):  # reference: greedy by repeated subtraction
        out = ""
        for v, sym in table:
            while n >= v:
                out, n = out + sym, n - v
        return out
    nums = [rng.randint(1, 3999) for _ in range(3)] + [4, 9, 14, 1994]
    if rng.random() < 0.5:
        return CodeTask("to_roman(n)", "returns the Roman numeral for the integer `n` (1 <= n <= 3999) using the "
                        "standard subtractive forms (IV, IX, XL, XC, CD, CM).",
                        src("""
                            def to_roman(n):
                                values = [1000, 900, 500, 400, 100, 90, 50, 40, 10, 9, 5, 4, 1]
                                symbols = ['M', 'CM', 'D', 'CD', 'C', 'XC', 'L', 'XL', 'X', 'IX', 'V', 'IV', 'I']
                                out = ''
                                for v, s in zip(values, symbols):
                                    q, n = divmod(n, v)
                                    out += s * q
                                return out"""),
                        to_roman, [(n,) for n in nums])
    lookup = {to_roman(n): n for n in range(1, 4000)}
    return CodeTask("from_roman(s)", "returns the integer value of the Roman numeral `s` (standard form, "
                    "1 to 3999, with subtractive pairs such as IV = 4 and CM = 900).",
                    src("""
                        def from_roman(s):
                            value = {'I': 1, 'V': 5, 'X': 10, 'L': 50, 'C': 100, 'D': 500, 'M': 1000}
                            total = 0
                            for i, c in enumerate(s):
                                if i + 1 < len(s) and value[c] < value[s[i + 1]]:
                                    total -= value[c]
                                else:
                                    total += value[c]
                            return total"""),
                    lambda s: lookup[s], [(to_roman(n),) for n in nums])


def c_merge_intervals(rng):
    touch = rng.random() < 0.5
    rule = "intervals that touch, like [1, 3] and [3, 5], also merge" if touch else \
        "intervals that only touch, like [1, 3] and [3, 5], stay separate"
    cmp = "<=" if touch else "<"

    def ref(iv):  # merge any overlapping pair until none is left, then sort
        out = [list(x) for x in iv]
        overlap = (lambda lo, hi: lo <= hi) if touch else (lambda lo, hi: lo < hi)
        merged = True
        while merged:
            merged = False
            for i in range(len(out)):
                for j in range(i + 1, len(out)):
                    (a1, b1), (a2, b2) = out[i], out[j]
                    if not merged and overlap(max(a1, a2), min(b1, b2)):
                        out[i], merged = [min(a1, a2), max(b1, b2)], True
                        del out[j]
                        break
        return sorted(out)

    def rand_intervals():
        out = []
        for _ in range(rng.randint(1, 5)):
            a = rng.randint(0, 20)
            out.append([a, a + rng.randint(1, 5)])  # no empty intervals: [3, 3] would be ambiguous
        return out
    return CodeTask("merge(intervals)", "takes a list of intervals [start, end] (start <= end, in any order) and "
                    f"returns the list of merged intervals sorted by start, where overlapping intervals merge; {rule}.",
                    src(f"""
                        def merge(intervals):
                            out = []
                            for a, b in sorted(intervals):
                                if out and a {cmp} out[-1][1]:
                                    out[-1][1] = max(out[-1][1], b)
                                else:
                                    out.append([a, b])
                            return out"""),
                    ref, [(rand_intervals(),) for _ in range(3)] + [([],), ([[1, 3], [3, 5]],), ([[4, 6], [1, 2], [2, 4]],)])


def c_edit_distance(rng):
    subs = rng.random() < 0.5
    ops = "insertions, deletions and substitutions" if subs else "insertions and deletions (no substitutions)"

    def ref(a, b):  # recursion over prefixes (the inputs are short)
        if not a or not b:
            return len(a) + len(b)
        if a[-1] == b[-1]:
            return ref(a[:-1], b[:-1])
        best = 1 + min(ref(a[:-1], b), ref(a, b[:-1]))
        return min(best, 1 + ref(a[:-1], b[:-1])) if subs else best
    sub_line = "\n                                        d[i - 1][j - 1] + 1," if subs else ""
    words = [(rand_word(rng, "abcd", 1, 5), rand_word(rng, "abcd", 1, 5)) for _ in range(3)]
    return CodeTask("edit_distance(a, b)", f"returns the smallest number of single-character {ops} that turn the "
                    "string `a` into the string `b`.",
                    src(f"""
                        def edit_distance(a, b):
                            d = [[i + j if i == 0 or j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
                            for i in range(1, len(a) + 1):
                                for j in range(1, len(b) + 1):
                                    if a[i - 1] == b[j - 1]:
                                        d[i][j] = d[i - 1][j - 1]
                                    else:
                                        d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1,{sub_line})
                            return d[len(a)][len(b)]"""),
                    ref, words + [("", "abc"), ("kitten", "sitting"), ("ab", "ba")])


def c_subset_sum(rng):
    t = rng.randint(1, 40)

    def ref(xs):  # try every subset
        from itertools import combinations
        return any(sum(c) == t for r in range(len(xs) + 1) for c in combinations(xs, r))
    return CodeTask("subset_sum(xs)", f"returns True if some subset of the list of positive integers `xs` (each "
                    f"element used at most once) adds up to exactly {t}, else False.",
                    src(f"""
                        def subset_sum(xs):
                            reachable = {{0}}
                            for x in xs:
                                reachable |= {{r + x for r in reachable}}
                            return {t} in reachable"""),
                    ref, lists(rng, 4, lo=1, hi=15, n_lo=2, n_hi=7, edge=([], [t])))


def c_word_break(rng):
    words = sorted(rng.sample(["a", "ab", "cd", "abc", "b", "bc", "ca", "d", "dab", "cab"], 4))

    def ref(s):  # plain recursion on the first word
        return s == "" or any(s.startswith(w) and ref(s[len(w):]) for w in words)
    made = ["".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(2)]
    inputs = [(w,) for w in made] + [(rand_word(rng, "abcd", 1, 7),) for _ in range(2)] + [("",), ("x",)]
    return CodeTask("can_split(s)", f"returns True if the string `s` can be split into a sequence of words from "
                    f"{words} (each word may be used any number of times), else False. The empty string can.",
                    src(f"""
                        def can_split(s):
                            ok = [True] + [False] * len(s)
                            for i in range(1, len(s) + 1):
                                ok[i] = any(ok[i - len(w)] and s[i - len(w):i] == w for w in {words!r} if len(w) <= i)
                            return ok[len(s)]"""),
                    ref, inputs)


def c_longest_distinct(rng):
    k = rng.randint(1, 3)

    def ref(s):  # try every substring
        ok = (lambda t: len(set(t)) == len(t)) if k == 1 else (lambda t: len(set(t)) <= k)
        return max((j - i for i in range(len(s)) for j in range(i + 1, len(s) + 1) if ok(s[i:j])), default=0)
    if k == 1:
        what = "no character repeated"
        body = """
                        def longest_part(s):
                            best, start, last = 0, 0, {}
                            for i, c in enumerate(s):
                                if last.get(c, -1) >= start:
                                    start = last[c] + 1
                                last[c] = i
                                best = max(best, i - start + 1)
                            return best"""
    else:
        what = f"at most {k} distinct characters"
        body = f"""
                        def longest_part(s):
                            best, start, counts = 0, 0, {{}}
                            for i, c in enumerate(s):
                                counts[c] = counts.get(c, 0) + 1
                                while len(counts) > {k}:
                                    counts[s[start]] -= 1
                                    if counts[s[start]] == 0:
                                        del counts[s[start]]
                                    start += 1
                                best = max(best, i - start + 1)
                            return best"""
    return CodeTask("longest_part(s)", f"returns the length of the longest contiguous substring of `s` with {what}.",
                    src(body), ref, strings(rng, 4, alphabet="abcd", n_hi=10, edge=("", "aaaa")),
                    # k + 1 distinct letters, the last doubled: the answer is k + 1, its length k + 2
                    extra=[("abcd"[:k + 1] + "abcd"[k],)])


CODE_LEVELS = [
    [c_map_const, c_extreme_or_default, c_linear, c_repeat, c_divisible, c_count_char, c_reverse, c_take],
    [c_sum_multiples, c_count_compare, c_count_letters, c_digits, c_sum_range, c_first_index, c_long_words],
    [c_fizzbuzz, c_palindrome, c_rle, c_dedupe, c_running, c_caesar, c_clamp],
    [c_primes, c_chunk, c_rotate, c_second_largest, c_brackets, c_to_base, c_two_sum, c_kth,
     c_base_digit_count, c_pair_count],
    [c_stairs, c_coins, c_lis, c_max_window, c_top_words, c_roman, c_merge_intervals, c_edit_distance,
     c_subset_sum, c_word_break, c_longest_distinct],
]


def build_code_row(task: CodeTask) -> tuple[str, str, str]:
    """CodeTask -> (question, tests, solution); checks the solution against the reference first,
    and that no trivial program passes the tests (adding the task's extra inputs until none does)."""
    name = task.signature.split("(")[0]
    env = {}
    exec(task.solution, env)  # our own generated program: trusted
    # The trivial programs of testcheck.TRIVIAL, run here in-process on our own inputs (a lambda per
    # return expression): the full check through the sandbox (tests/test_data.py) would take minutes.
    # `trivial` keeps those that pass every case so far.
    trivial = {label: eval(f"lambda *args, **kwargs: {expr}") for label, expr in TRIVIAL}
    todo, extra, lines = list(task.inputs), list(task.extra), []
    while todo:
        args = todo.pop(0)
        want, got = task.ref(*args), env[name](*args)
        # Not `assert`: this check must survive `python -O`. The reprs compare types too, as
        # the reward does (the solution must not return 1 where the reference says True).
        if got != want or repr(got) != repr(want):
            raise ValueError(f"{task.signature}: solution gives {got!r}, reference {want!r} on {args!r}")
        call = f"{name}({', '.join(map(repr, args))})"
        # The expected value travels as its repr and is read back with ast.literal_eval, which
        # must give the same value and types (repr tells 1 from True and a tuple from a list).
        if repr(ast.literal_eval(repr(want))) != repr(want):
            raise ValueError(f"{task.signature}: expected value {want!r} is not a plain literal")
        lines.append(f"{call} == {want!r}")
        if len(lines) == 1:
            example = f"`{call}` should return `{want!r}`"
        for label, f in list(trivial.items()):
            try:
                value = f(*args)
            except Exception:  # noqa: BLE001 - a trivial program that errors does not pass
                del trivial[label]
                continue
            if value != want or repr(value) != repr(want):
                del trivial[label]
        if not todo and trivial and extra:
            todo.append(extra.pop(0))
    if trivial:
        raise ValueError(f"{task.signature}: a program returning {next(iter(trivial))} passes every test; "
                         f"give its template an `extra` input whose answer differs")
    question = f"Write a Python function `{task.signature}` that {task.spec}\nFor example, {example}."
    return question, "\n".join(lines), task.solution


# -----------------------------------------------------------------------------
# Drawing the splits. Each level draws distinct problems until it has enough for both splits; the
# test split takes the first n_test, so no question text appears in both (nor at two levels: the
# `seen` set is shared). Code problems are kept distinct by their statement alone: the example
# line varies with the random tests, and two rows that differ only in it are the same problem.


def draw_level(rng, make, n: int, label: str, seen: set, key=lambda row: row[0]) -> list:
    """n problems from `make` whose keys are not in `seen` (which is updated)."""
    rows = []
    for _ in range(200 * n + 1000):
        if len(rows) == n:
            return rows
        row = make(rng)
        if key(row) not in seen:
            seen.add(key(row))
            rows.append(row)
    raise RuntimeError(f"{label}: only {len(rows)} distinct problems found, {n} asked for")


def make_math(seed: int, n_train: int, n_test: int):
    train, test, seen = [], [], set()
    for level, (make, k_train, k_test) in enumerate(
            zip(MATH_LEVELS, split_counts(n_train, len(MATH_LEVELS)), split_counts(n_test, len(MATH_LEVELS))),
            start=1):
        rng = random.Random(f"{seed}-math-{level}")  # a stream per level: resizing one keeps the rest
        rows = draw_level(rng, make, k_train + k_test, f"math level {level}", seen)
        test += [(q, a, level) for q, a in rows[:k_test]]
        train += [(q, a, level) for q, a in rows[k_test:]]
    out = {}
    for split, rows in (("train", train), ("test", test)):
        # Shuffle so a loader that reads the first N rows still sees every level.
        random.Random(f"{seed}-math-{split}-order").shuffle(rows)
        out[split] = [{"id": f"math-{split}-{i:06d}", "domain": "math", "question": q, "answer": a, "level": lv}
                      for i, (q, a, lv) in enumerate(rows, start=1)]
    return out


def make_code(seed: int, n_train: int, n_test: int):
    train, test, seen = [], [], set()
    n_levels = len(CODE_LEVELS)
    for level, (templates, k_train, k_test) in enumerate(
            zip(CODE_LEVELS, split_counts(n_train, n_levels), split_counts(n_test, n_levels)), start=1):
        rng = random.Random(f"{seed}-code-{level}")
        make = lambda r: build_code_row(r.choice(templates)(r))  # noqa: E731
        rows = draw_level(rng, make, k_train + k_test, f"code level {level}", seen,
                          key=lambda row: row[0].split("\n")[0])
        test += [row + (level,) for row in rows[:k_test]]
        train += [row + (level,) for row in rows[k_test:]]
    out = {}
    for split, rows in (("train", train), ("test", test)):
        random.Random(f"{seed}-code-{split}-order").shuffle(rows)
        out[split] = [{"id": f"code-{split}-{i:06d}", "domain": "code", "question": q, "tests": t,
                       "solution": s, "level": lv} for i, (q, t, s, lv) in enumerate(rows, start=1)]
    return out


def write_jsonl(path: str, rows: list[dict]):
    # newline="\n" and sorted-free fixed key order: the bytes are identical on every platform.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=HERE, help="output folder (default: this data/ folder)")
    p.add_argument("--seed", type=int, default=SEED, help="base seed; the same seed gives the same bytes")
    p.add_argument("--math-train", type=int, default=2000, help="math training rows (spread over 6 levels)")
    p.add_argument("--math-test", type=int, default=200, help="held-out math rows")
    p.add_argument("--code-train", type=int, default=600, help="code training rows (spread over 5 levels)")
    p.add_argument("--code-test", type=int, default=100, help="held-out code rows")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    math_rows = make_math(args.seed, args.math_train, args.math_test)
    code_rows = make_code(args.seed, args.code_train, args.code_test)
    for name, rows in (("math_train", math_rows["train"]), ("math_test", math_rows["test"]),
                       ("code_train", code_rows["train"]), ("code_test", code_rows["test"])):
        path = os.path.join(args.out, f"{name}.jsonl")
        write_jsonl(path, rows)
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
