"""The repository stands alone and its README names what exists."""
import importlib
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_file_cites_a_path_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    outside = re.compile("/" + "work/|shared" + "/spec|architecture" + r"\.md")
    bad = []
    for f in files:
        try:
            text = open(os.path.join(ROOT, f), encoding="utf-8").read()
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue                                              # binary files (checkpoints)
        bad += [f"{f}:{i + 1}" for i, line in enumerate(text.splitlines()) if outside.search(line)]
    assert len(files) > 10 and not bad, bad


def resolves(name, modules):
    """`Class.attr` in one of `modules`, or `module.attr` for a module of the repository."""
    head, *rest = name.split(".")
    candidates = [(m, name.split(".")) for m in modules]
    if os.path.exists(os.path.join(ROOT, head + ".py")):
        candidates.append((importlib.import_module(head), rest))
    for obj, parts in candidates:
        try:
            for p in parts:
                obj = getattr(obj, p)
            return True
        except AttributeError:
            pass
    return False


def test_readme_paper_to_code_table_names_what_exists():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = readme[readme.index("## Paper to code"):readme.index("## Training on VoxCeleb")]
    names = 0
    for row in table.splitlines()[4:]:
        if not row.startswith("|"):
            continue
        *_, files, code = [c.strip() for c in row.strip("|").split("|")]
        modules = [importlib.import_module(f.strip()[:-3]) for f in files.split(",")]
        for name in re.findall(r"`([A-Za-z_][\w.]*)", code):
            assert resolves(name, modules), f"README names {name!r} ({files}), which does not exist"
            names += 1
    assert names > 40


def heading_anchors(path):
    """GitHub's anchors of a Markdown file's headings (not the comments of its code blocks): lowercase,
    punctuation dropped, spaces -> '-'."""
    anchors, in_code = set(), False
    for line in open(path, encoding="utf-8"):
        in_code ^= line.lstrip().startswith("```")
        if line.startswith("#") and not in_code:
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_link_into_a_markdown_section_finds_its_heading():
    docs = [f for f in os.listdir(ROOT) if f.endswith(".md")]
    links = 0
    for doc in docs:
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        for target, anchor in re.findall(r"\]\(([\w.]*\.md)?#([^)\s]+)\)", text):
            anchors = heading_anchors(os.path.join(ROOT, target or doc))
            assert anchor in anchors, f"{doc} links to {target or doc}#{anchor}, a heading that does not exist"
            links += 1
    assert links > 10
