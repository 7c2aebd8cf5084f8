"""What `eventbuffer query` runs without --write: one statement ClickHouse parsed as a read.

ClickHouse's `readonly = 1` refuses writes to tables, but not everything a
query can reach: `INTO OUTFILE` is written by the client (chDB is the client),
and table functions run their schema inference under `DESCRIBE` and in other
places (`DESCRIBE file('/etc/passwd', ...)`, `DESCRIBE url(...)` connecting
anywhere). A regex over the text cannot know what ClickHouse's lexer does with
a heredoc or a zero-width space, so the engine parses the statement itself:

1. `formatQuerySingleLine` turns the text into ClickHouse's own rendering of
   one statement (several statements, or none, are a syntax error there).
   Comments, heredocs and characters the lexer skips are gone from it; that
   text, not the one typed, is what is checked and then run.
2. `EXPLAIN AST` of that text gives the syntax tree, one node a line. Only
   SELECT, SHOW, DESCRIBE, EXISTS and EXPLAIN of those are let through; a
   literal hanging off a statement is its `INTO OUTFILE` file name; a
   function the engine lists in `system.table_functions` must be one that
   reads nothing outside ClickHouse (numbers, values, view...), wherever it
   appears; `file()` is refused as a plain function too. (`INTO OUTFILE` is
   also looked for in the rendering outside its quotes, in case a parser
   ever hung it on the EXPLAIN, whose own is not printed.)

Names are printed in the tree unquoted, so a name holding a newline could
forge lines: names with escaped characters are refused (a quoted name with a
backslash in ClickHouse's rendering), and the tree must add up (each node's
child count matches the lines under it). The statement then runs with
`readonly = 1` as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from worker.cli.common import CliError
from worker.errors import SinkError
from worker.sinks.base import Sink

SYNTAX_ERROR = 62
UNKNOWN_FUNCTION = 46

# Statements (EXPLAIN AST's node names) that only read.
STATEMENTS = frozenset(
    {
        "SelectWithUnionQuery",
        "ShowTables",  # also SHOW DATABASES, DICTIONARIES, SETTINGS
        "ShowColumns",
        "ShowIndexes",
        "ShowCreateTableQuery",
        "ShowCreateDatabaseQuery",
        "ShowProcesslistQuery",
        "ShowEngineQuery",
        "ShowFunctions",
        "DescribeQuery",
        "ExistsTableQuery",
        "ExistsDatabaseQuery",
        "Explain",
    }
)
# Nodes inside a SELECT whose names also end in "Query".
_SELECT_PARTS = frozenset({"SelectQuery", "SelectIntersectExceptQuery", "TablesInSelectQuery"})
EXPLAIN_KINDS = frozenset(
    {
        "EXPLAIN",
        "EXPLAIN AST",
        "EXPLAIN SYNTAX",
        "EXPLAIN PLAN",
        "EXPLAIN PIPELINE",
        "EXPLAIN ESTIMATE",
        "EXPLAIN QUERY TREE",
    }
)
# Table functions that read nothing outside ClickHouse's own tables (lower case).
SAFE_TABLE_FUNCTIONS = frozenset(
    {
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
        "generate_series",
        "generateseries",
        "primes",
        "values",
        "null",
        "view",
        "merge",
        "generaterandom",
        "format",
    }
)
# Plain functions that read files or load code (lower case); `file` is both.
UNSAFE_FUNCTIONS = frozenset({"file", "catboostevaluate", "modelevaluate"})

_NODE = re.compile(r"^( *)([A-Za-z]+)(.*?)(?: \(children (\d+)\))?$")
_HINT = "pass --write to run it unchecked"


@dataclass
class Node:
    """One line of EXPLAIN AST: its node name, the rest of the line, its children."""

    kind: str
    text: str
    declared: int
    children: list[Node] = field(default_factory=list)

    @property
    def function(self) -> str:
        """The function's name, for a `Function` node."""
        return self.text.strip().split(" ", 1)[0]


def read_only_statement(sink: Sink, sql: str) -> str:
    """ClickHouse's text of `sql` if it is one statement that only reads; else CliError (2)."""
    try:
        text = sink.format_query(sql)
    except SinkError as exc:
        if exc.code not in (SYNTAX_ERROR, UNKNOWN_FUNCTION):
            raise
        raise _parse_refusal(exc) from None
    code, escaped_name = _code(text)
    # The tree shows INTO OUTFILE too (below); this holds should a parser ever
    # attach it to the EXPLAIN around the statement, whose own is not printed.
    if re.search(r"\bINTO\s+OUTFILE\b", code, re.IGNORECASE):
        raise CliError(f"refusing INTO OUTFILE: it writes a file; {_HINT}", 2)
    if escaped_name:
        raise CliError(
            "refusing a quoted name holding escaped characters (a newline, a quote or a "
            f"backslash): it cannot be checked; {_HINT}",
            2,
        )
    # Errors here (a setting the statement sets under readonly, a server gone)
    # are ClickHouse's own, as when the statement runs.
    lines = [str(row[0]) for row in sink.query(f"EXPLAIN AST {text}", readonly=True)]
    table_functions = {
        str(name).lower()
        for (name,) in sink.query("SELECT name FROM system.table_functions", readonly=True)
    }
    check(tree(lines), table_functions)
    return text


def tree(lines: list[str]) -> Node:
    """The syntax tree EXPLAIN AST printed; CliError if the lines do not add up to one."""
    stack: list[Node] = []
    root: Node | None = None
    for line in lines:
        match = _NODE.match(line)
        if match is None:
            raise _unreadable(line)
        depth = len(match.group(1))
        node = Node(match.group(2), match.group(3), int(match.group(4) or 0))
        if depth == 0 and root is None:
            root = node
        elif 0 < depth <= len(stack):
            stack[depth - 1].children.append(node)
        else:
            raise _unreadable(line)
        del stack[depth:]
        stack.append(node)
    if root is None:
        raise _unreadable("")
    _check_counts(root)
    return root


def check(root: Node, table_functions: set[str]) -> None:
    """CliError (2) unless the tree is one reading statement reaching nothing outside."""
    _check_statement(root)
    pending = [root]
    while pending:
        node = pending.pop()
        if node.kind.endswith("Query") and node.kind not in STATEMENTS | _SELECT_PARTS:
            raise _refuse_statement(node)
        if node.kind in STATEMENTS:
            if any(child.kind == "Literal" for child in node.children):
                raise CliError(f"refusing INTO OUTFILE: it writes a file; {_HINT}", 2)
            if node.kind == "Explain":
                _check_explain(node)
        if node.kind == "Function":
            name = node.function.lower()
            if name in UNSAFE_FUNCTIONS or (
                name in table_functions and name not in SAFE_TABLE_FUNCTIONS
            ):
                raise CliError(
                    f"refusing {node.function}(): it reads files or other servers (table "
                    "functions that read only ClickHouse itself, such as numbers(), are "
                    f"allowed); {_HINT}",
                    2,
                )
        if node.kind == "TableExpression":
            for child in node.children:
                if child.kind == "Function" and child.function.lower() not in SAFE_TABLE_FUNCTIONS:
                    raise CliError(
                        f"refusing the table function {child.function}(): only numbers(), "
                        f"zeros(), values(), view() and other local ones are allowed; {_HINT}",
                        2,
                    )
        pending.extend(node.children)


def _check_statement(node: Node) -> None:
    if node.kind not in STATEMENTS:
        raise _refuse_statement(node)


def _check_explain(node: Node) -> None:
    if node.text.strip() not in EXPLAIN_KINDS:
        raise CliError(f"refusing {node.text.strip()}: not a plain EXPLAIN; {_HINT}", 2)
    explained = [child for child in node.children if child.kind != "Set"]
    if len(explained) != 1:
        raise _unreadable(node.kind)
    _check_statement(explained[0])


def _refuse_statement(node: Node) -> CliError:
    shown = node.kind.removesuffix("Query") if node.kind.endswith("Query") else node.kind
    return CliError(
        f"refusing {shown.upper()}: read-only by default (SELECT, SHOW, DESCRIBE, EXISTS "
        "and EXPLAIN of them); pass --write to run it",
        2,
    )


def _check_counts(node: Node) -> None:
    if node.declared != len(node.children):
        raise _unreadable(f"{node.kind}{node.text}")
    for child in node.children:
        _check_counts(child)


def _code(text: str) -> tuple[str, bool]:
    """ClickHouse's rendering without its quoted parts, and whether a quoted name escapes.

    The rendering quotes strings with ' and names with ` (or "), escaping
    with a backslash, and has no comments: a string may hold anything, a name
    nothing escaped.
    """
    code: list[str] = []
    quote = ""
    escaped_name = False
    i = 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                escaped_name |= quote != "'"
                i += 1
            elif char == quote:
                quote = ""
                code.append(" ")
        elif char in "'`\"":
            quote = char
        else:
            code.append(char)
        i += 1
    return "".join(code), escaped_name


def _parse_refusal(exc: SinkError) -> CliError:
    if exc.code == UNKNOWN_FUNCTION:
        return CliError(
            "cannot check that the query only reads: this ClickHouse has no "
            f"formatQuerySingleLine to parse it with ({_short(exc)}); {_HINT}",
            2,
        )
    if "multi-statement" in str(exc).lower() or "multiple statements" in str(exc).lower():
        return CliError(
            f"refusing it: several statements ({_short(exc)}); a read-only query is one "
            "statement; --write runs the text as typed",
            2,
        )
    return CliError(f"ClickHouse cannot parse the query: {_short(exc)}", 2)


def _unreadable(line: str) -> CliError:
    return CliError(
        f"refusing it: ClickHouse's syntax tree does not read back ({line[:80]!r}); {_HINT}", 2
    )


def _short(exc: SinkError) -> str:
    return " ".join(str(exc).split())[:300]
