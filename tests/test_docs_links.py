"""The user's guide names only what exists: README.md and docs/*.md are checked against the repository.

- every relative link `[text](path#anchor)` reaches a file (and a heading of it, for an anchor);
- every repository path written in backticks or in a code block (`conf/...`, `src/...`, `scripts/...`,
  ...) exists, and so does every entry of the README's project-layout tree;
- every module named `gridvqa.a.b[.name]` exists (and defines `name`);
- every `--flag` of a `python -m gridvqa.<tool>` / `python scripts/<tool>.py` command is one that tool
  defines, and every Hydra command line composes with the real configs (unknown keys or groups fail).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_DIRS = ("conf", "src", "scripts", "tests", "docs", "results", "notebooks")
HYDRA_ENTRIES = {"train", "evaluate", "extract", "predict", "visualize", "reproduce"}

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
BACKTICK = re.compile(r"`([^`\n]+)`")
MODULE = re.compile(r"(?<![\w.-])gridvqa(?:\.[A-Za-z_]\w*)+")
REPO_PATH = re.compile(rf"^(?:{'|'.join(TOP_DIRS)})/[\w./-]*$")
COMMAND = re.compile(r"python(?:3)?\s+(-m\s+gridvqa(?:\.\w+)+|scripts/\w+\.py)")


def _doc_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _code_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def _prose(text: str) -> str:
    """The text outside code blocks, lines joined (an inline code span may wrap onto the next line)."""
    return FENCE.sub("", text).replace("\n", " ")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))  # headings need their lines
    return {github_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)}


def dangling_links(path: Path) -> list[str]:
    out = []
    for target in LINK.findall(_prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            out.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            out.append(f"{target}: no heading #{anchor} in {dest.name}")
    return out


def _path_tokens(text: str) -> set[str]:
    """Repository paths named in backticks or as words of a code block."""
    words = set(BACKTICK.findall(_prose(text)))
    for block in _code_blocks(text):
        for line in block.splitlines():
            words.update(w.strip("'\"(),;:") for w in line.split("#")[0].split())
    return {w.rstrip(".") for w in words if REPO_PATH.match(w) and ".." not in w}


def missing_paths(path: Path) -> list[str]:
    return sorted(p for p in _path_tokens(path.read_text(encoding="utf-8")) if not (ROOT / p).exists())


def layout_tree_entries(readme: str) -> list[str]:
    """The paths of the README's project-layout tree: an indented line names entries of the folder on
    the nearest less-indented line that names a single folder; words after `#` are comments."""
    section = readme.split("## Project layout", 1)[1]
    block = _code_blocks(section)[0]
    stack: list[tuple[int, str]] = []
    entries = []
    for line in block.splitlines():
        words = line.split("#")[0].split()
        if not words:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        entries += [parent + w for w in words]
        if len(words) == 1 and words[0].endswith("/"):
            stack.append((indent, parent + words[0]))
    return entries


def _module_file(parts: list[str]) -> tuple[Path | None, list[str]]:
    """(file defining the longest existing module prefix of gridvqa.<parts>, the parts left over)."""
    here, used = SRC / "gridvqa", 0
    for part in parts:
        if (here / part).is_dir():
            here, used = here / part, used + 1
        elif (here / f"{part}.py").is_file():
            return here / f"{part}.py", parts[used + 1:]
        else:
            break
    init = here / "__init__.py"
    return (init if init.is_file() and used else None), parts[used:]


def _imported_names(source: str) -> list[str]:
    """The name lists of `from x import ...` statements (a package re-exports what it imports)."""
    found = re.findall(r"^from\s+\S+\s+import\s+(?:\(([^)]*)\)|([^\n]+))", source, re.MULTILINE)
    return [a or b for a, b in found]


def unknown_modules(text: str) -> list[str]:
    out = []
    for name in sorted(set(MODULE.findall(text))):
        file, rest = _module_file(name.split(".")[1:])
        if file is None:
            out.append(f"{name}: no such module")
            continue
        if rest:
            source = file.read_text(encoding="utf-8")
            defined = re.compile(rf"^\s*(?:def|class)\s+{rest[0]}\b|^{rest[0]}\s*[:=]", re.MULTILINE)
            imported = any(re.search(rf"\b{rest[0]}\b", names) for names in _imported_names(source))
            if not defined.search(source) and not imported:
                out.append(f"{name}: {file.relative_to(ROOT)} defines no {rest[0]}")
    return out


def commands(text: str) -> list[str]:
    """Every `python -m gridvqa...` / `python scripts/...` command line (continuations joined)."""
    lines = []
    for block in _code_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [ln.strip() for ln in joined.splitlines()]
    lines += BACKTICK.findall(_prose(text))
    out = []
    for line in lines:
        m = COMMAND.search(line)
        if m:
            out.append(line[m.start():])
    return out


def _tool_sources(tool: str) -> list[Path]:
    """The files that define a command's options: its module (or package), a script and what it imports."""
    if tool.startswith("scripts/"):
        files = [ROOT / tool]
        source = files[0].read_text(encoding="utf-8") if files[0].is_file() else ""
        for mod in re.findall(r"^\s*(?:from|import)\s+(gridvqa(?:\.\w+)+)", source, re.MULTILINE):
            file, _ = _module_file(mod.split(".")[1:])
            files += [file] if file else []
        return [f for f in files if f.is_file()]
    file, rest = _module_file(tool.split(".")[1:])
    if file is None or rest:
        return []
    return sorted(file.parent.glob("*.py")) if file.name in ("__init__.py", "__main__.py") else [file]


def _words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def unknown_flags(command: str) -> list[str]:
    m = COMMAND.match(command)
    tool = m.group(1).removeprefix("-m").strip()
    sources = _tool_sources(tool)
    if not sources:
        return [f"{tool}: no such module or script"]
    text = "\n".join(f.read_text(encoding="utf-8") for f in sources)
    flags = {w.split("=")[0] for w in re.findall(r"(?<![\w-])--[a-z][\w-]*", command.split("#")[0])}
    return [f"{tool} {flag}" for flag in sorted(flags) if f'"{flag}"' not in text and f"'{flag}'" not in text]


def hydra_overrides(command: str) -> tuple[str, list[str]] | None:
    """(config name, overrides) of a Hydra entry point's command line; a sweep's first value of each
    comma list stands for the sweep."""
    m = re.match(r"python(?:3)?\s+-m\s+gridvqa\.(\w+)(\s|$)", command)
    if not m or m.group(1) not in HYDRA_ENTRIES:
        return None
    words = _words(command)[3:]
    multirun = "-m" in words or "--multirun" in words
    overrides = []
    for w in words:
        if w.startswith("-") or "=" not in w or w.startswith("$"):
            continue
        key, _, value = w.partition("=")
        if re.fullmatch(r"[A-Z][A-Z_0-9]*", value):  # a placeholder (experiment=NAME): any value
            continue
        if multirun and "," in value and not re.search(r"[\[\]{}()]", value):
            value = value.split(",")[0]
        overrides.append(f"{key}={value}")
    return m.group(1), overrides


def _all_commands() -> list[tuple[str, str]]:
    return [(_doc_id(p), c) for p in DOCS for c in commands(p.read_text(encoding="utf-8"))]


# ---------------------------------------------------------------------------------------------------


def test_checks_catch_what_does_not_exist(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("# Title\n[a](missing.md) [b](x.md#title) [c](x.md#nope) [d](https://example.org)\n")
    assert dangling_links(doc) == ["missing.md: no such file", "x.md#nope: no heading #nope in x.md"]
    named = "see `src/gridvqa/nothing_here.py` and `conf/train.yaml`\n```\nls scripts/no.py\n```\n"
    assert _path_tokens(named) == {"src/gridvqa/nothing_here.py", "conf/train.yaml", "scripts/no.py"}
    modules = "`gridvqa.data.images.ImageSpec` `gridvqa.nothing` `gridvqa.data.images.Nope`"
    assert unknown_modules(modules) == [
        "gridvqa.data.images.Nope: src/gridvqa/data/images.py defines no Nope",
        "gridvqa.nothing: no such module",
    ]
    assert unknown_flags("python -m gridvqa.data.prepare ROOT --answer-splits train --no-such-flag") == [
        "gridvqa.data.prepare --no-such-flag"
    ]
    sweep = "python -m gridvqa.train -m experiment=frozen,e2e seed=1,2 'x=[1,2]' y=DIR  # c=d"
    assert hydra_overrides(sweep) == ("train", ["experiment=frozen", "seed=1", "x=[1,2]"])
    tree = "## Project layout\n\n```\nsrc/gridvqa/\n  data/   # x\n    vg.py check.py\n  cli.py\n```\n"
    assert layout_tree_entries(tree) == ["src/gridvqa/", "src/gridvqa/data/", "src/gridvqa/data/vg.py",
                                         "src/gridvqa/data/check.py", "src/gridvqa/cli.py"]


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_links_resolve(doc):
    assert not dangling_links(doc), f"{_doc_id(doc)}: dangling links:\n" + "\n".join(dangling_links(doc))


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_named_paths_exist(doc):
    missing = missing_paths(doc)
    assert not missing, f"{_doc_id(doc)} names repository paths that do not exist:\n" + "\n".join(missing)


def test_project_layout_tree_exists():
    entries = layout_tree_entries((ROOT / "README.md").read_text(encoding="utf-8"))
    assert any(e.startswith("src/gridvqa/") for e in entries)
    missing = [e for e in entries if not (ROOT / e).exists()]
    assert not missing, "README project layout names what does not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_named_modules_exist(doc):
    bad = unknown_modules(doc.read_text(encoding="utf-8"))
    assert not bad, f"{_doc_id(doc)}:\n" + "\n".join(bad)


def test_command_flags_exist():
    found = _all_commands()
    assert any("gridvqa.data.prepare" in c for _, c in found)
    bad = [f"{doc}: {problem}" for doc, c in found for problem in unknown_flags(c)]
    assert not bad, "commands with options their tool does not define:\n" + "\n".join(bad)


def test_hydra_commands_compose():
    from gridvqa.config import compose_config
    from gridvqa.reproduce.options import load_config as load_reproduce_config

    cases: dict[tuple[str, tuple[str, ...]], str] = {}
    for doc, c in _all_commands():
        parsed = hydra_overrides(c)
        if parsed:
            cases.setdefault((parsed[0], tuple(parsed[1])), f"{doc}: {c}")
    assert len(cases) > 10
    bad = []

    def attempt(where: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - every failure is reported with its command
            bad.append(f"{where}\n    {type(e).__name__}: {str(e).splitlines()[0]}")

    def compose_entry(name: str, overrides: list[str]) -> None:
        compose_config(name, overrides, return_hydra_config=True)

    for (name, overrides), where in cases.items():
        if name != "reproduce":
            attempt(where, compose_entry, name, list(overrides))
    attempt("a key no config has", compose_entry, "train", ["experiment=e2e", "model.no_such_key=1"])
    assert bad and bad[-1].startswith("a key no config has"), "composing must reject unknown keys"
    bad.pop()
    for (name, overrides), where in cases.items():
        if name == "reproduce":  # composes its own config (its override lists may be plain strings)
            attempt(where, load_reproduce_config, list(overrides))
    assert not bad, "documented commands that do not compose:\n" + "\n".join(bad)
