"""The site-packages corpora: fake standard library and site-packages trees in tmp_path stand in
for the interpreter's (memlm.data.site_packages.site_packages_roots is patched); only the last test
lists the real trees, without reading them."""

import json
import os

import pytest

from memlm.data import SPLITS, assign_split, prepare
from memlm.data import site_packages as sources_module
from memlm.data.cache import _assigned_documents
from memlm.data.errors import DataError
from memlm.data.site_packages import SITE_PACKAGES_TEXT, SitePackages
from memlm.data.sources import parse_spec

FRACTIONS = (0.5, 0.25, 0.25)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def dist_info(site, name, version, files):
    """A fake installed distribution: <name>-<version>.dist-info with METADATA and RECORD."""
    meta = site / f"{name.replace('-', '_')}-{version}.dist-info"
    write(meta / "METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode())
    record = [*files, f"{meta.name}/METADATA,,", f"{meta.name}/RECORD,,"]
    write(meta / "RECORD", "".join(f"{f.split(',')[0]},,\n" for f in record).encode())


def use_roots(monkeypatch, *roots):
    """Make the site-packages specs read these (role, path) roots instead of the interpreter's."""
    monkeypatch.setattr(sources_module, "site_packages_roots", lambda: [(role, path) for role, path in roots])


def venv_machine(base):
    """A virtual environment's layout: the stdlib apart from the venv's site-packages, the base
    interpreter's own site-packages inside the stdlib (not this interpreter's: never read)."""
    stdlib, site = base / "usr" / "lib" / "python3.11", base / "venv" / "lib" / "python3.11" / "site-packages"
    return stdlib, site, [("stdlib", stdlib), ("purelib", site)]


def plain_machine(base):
    """A plain installation: site-packages inside the stdlib, and a user site elsewhere."""
    stdlib = base / "opt" / "python" / "lib" / "python3.11"
    site, user = stdlib / "site-packages", base / "home" / ".local" / "lib" / "python3.11" / "site-packages"
    return stdlib, site, user, [("stdlib", stdlib), ("platlib", site), ("user", user)]


def docs(source):
    return {d.name: bytes(d.data) for d in source.documents()}


def splits(source):
    """{document name: split} as a build assigns them."""
    return {doc.name: split for split, doc in _assigned_documents([source], FRACTIONS)}


def test_duplicate_contents_are_kept_once_under_the_first_name(tmp_path, monkeypatch):
    stdlib, site, roots = venv_machine(tmp_path)
    same = b"def shared():\n    return 42\n"
    write(stdlib / "b_mod" / "copy.py", same)
    write(site / "a_pkg" / "_vendor" / "copy.py", same)  # first in name order: kept
    write(site / "z_pkg" / "copy.py", same)
    write(site / "a_pkg" / "__init__.py", b"")  # empty: skipped (every empty file is the same)
    write(stdlib / "os.py", b"import sys\n")
    write(site / "a_pkg" / "other.py", b"def shared():\n    return 43\n")  # differs by one byte: kept
    use_roots(monkeypatch, *roots)
    (source,) = parse_spec("site-packages")
    got = docs(source)
    assert got == {"a_pkg/_vendor/copy.py": same, "a_pkg/other.py": b"def shared():\n    return 43\n",
                   "os.py": b"import sys\n"}
    assert list(got) == sorted(got)
    inventory = source.inventory()
    assert inventory["files"] == 3 and inventory["bytes"] == sum(map(len, got.values())) == 28 + 28 + 11
    assert inventory["skipped"] == {"duplicate": 2, "binary": 0, "empty": 1, "unreadable": 0}
    assert [d.package for d in source.documents()] == ["a_pkg", "a_pkg", "os"]


def test_split_depends_only_on_the_path_relative_to_its_root(tmp_path, monkeypatch, cache):
    files = {f"pkg{i % 4}/mod{i}.py": f"x = {i}\n".encode() for i in range(40)}
    # machine A: a virtual environment, every file in its site-packages
    stdlib_a, site_a, roots_a = venv_machine(tmp_path / "a")
    write(stdlib_a / "os.py", b"import sys\n")
    for name, data in files.items():
        write(site_a / name, data)
    # machine B: a plain installation; the same files, half in the platlib inside the stdlib, half in the user site
    stdlib_b, site_b, user_b, roots_b = plain_machine(tmp_path / "b")
    write(stdlib_b / "os.py", b"import sys\n")
    for i, (name, data) in enumerate(files.items()):
        write((site_b if i % 2 else user_b) / name, data)
    use_roots(monkeypatch, *roots_a)
    (on_a,) = parse_spec("site-packages")
    use_roots(monkeypatch, *roots_b)
    (on_b,) = parse_spec("site-packages")
    assert on_a.key != on_b.key  # other absolute roots: another cache entry ...
    by_a, by_b = splits(on_a), splits(on_b)
    assert by_a == by_b  # ... with the same documents in the same splits
    assert set(by_a) == {"os.py", *files}  # the platlib inside the stdlib is read once, as its own root
    assert by_a == {name: assign_split(name, FRACTIONS) for name in by_a}
    assert set(by_a.values()) == set(SPLITS)
    built_a = prepare("site-packages", fractions=FRACTIONS, progress=False)  # roots B still in place
    assert built_a.manifest["inventory"][0]["roots"] == [{"role": r, "path": str(p)} for r, p in roots_b]
    use_roots(monkeypatch, *roots_a)
    built_b = prepare("site-packages", fractions=FRACTIONS, progress=False)
    assert built_a.path != built_b.path
    assert ({s: built_a.manifest["splits"][s]["sha1"] for s in SPLITS}
            == {s: built_b.manifest["splits"][s]["sha1"] for s in SPLITS})  # the same bytes in each split
    # new contents under the same name keep the split
    for name in files:
        write(site_a / name, b"# edited\n" + files[name] * 3)
    (edited,) = parse_spec("site-packages")
    assert splits(edited) == by_a


def test_hidden_cache_binary_unreadable_and_foreign_site_packages_are_skipped(tmp_path, monkeypatch):
    stdlib, site, roots = venv_machine(tmp_path)
    write(stdlib / "json" / "__init__.py", b"# json\n")
    write(stdlib / "json" / "__pycache__" / "cached.py", b"# in __pycache__\n")
    write(stdlib / "site-packages" / "base_only.py", b"# the base interpreter's site-packages\n")
    write(stdlib / "dist-packages" / "debian_only.py", b"# another interpreter's dist-packages\n")
    write(site / ".hidden" / "secret.py", b"# hidden directory\n")
    write(site / "pkg" / ".dotfile.py", b"# hidden file\n")
    write(site / "pkg" / "mod.py", b"# kept\n")
    write(site / "pkg" / "mod.pyc", b"# not .py\n")
    write(site / "pkg" / "blob.py", b"binary\x00data\n")
    os.symlink(site / "pkg" / "gone.py", site / "pkg" / "dangling.py")
    write(stdlib / "nested" / "zz.py", b"# a root inside another root: read once, named from its own root\n")
    use_roots(monkeypatch, *roots, ("user", stdlib / "nested"))
    (source,) = parse_spec("site-packages")
    assert source.candidates == [("json/__init__.py", 0), ("pkg/blob.py", 1), ("pkg/dangling.py", 1),
                                 ("pkg/mod.py", 1), ("zz.py", 2)]
    assert set(docs(source)) == {"json/__init__.py", "pkg/mod.py", "zz.py"}
    assert docs(source)["pkg/mod.py"] == b"# kept\n"
    assert source.inventory()["skipped"] == {"duplicate": 0, "binary": 1, "empty": 0, "unreadable": 1}
    assert source.stamp()[1:] == [[0, "json/__init__.py", 7, (stdlib / "json" / "__init__.py").stat().st_mtime_ns],
                                  [1, "pkg/blob.py", 12, (site / "pkg" / "blob.py").stat().st_mtime_ns],
                                  [1, "pkg/dangling.py", -1, -1],
                                  [1, "pkg/mod.py", 7, (site / "pkg" / "mod.py").stat().st_mtime_ns],
                                  [2, "zz.py", 65, (stdlib / "nested" / "zz.py").stat().st_mtime_ns]]


def test_manifest_records_roots_sizes_and_distributions_with_versions(tmp_path, monkeypatch, cache):
    stdlib, site, roots = venv_machine(tmp_path)
    write(stdlib / "os.py", b"import sys\n")
    write(site / "fakepkg" / "__init__.py", b"VERSION = '1.2.3'\n")
    write(site / "six.py", b"PY3 = True\n")
    dist_info(site, "fakepkg", "1.2.3", ["fakepkg/__init__.py"])
    dist_info(site, "six", "1.16.0", ["six.py"])
    dist_info(site, "Another-Dist", "0.1", [])
    use_roots(monkeypatch, *roots)
    corpus = prepare("site-packages", fractions=FRACTIONS, progress=False)
    on_disk = json.loads((corpus.path / "manifest.json").read_text())
    assert on_disk["inventory"] == corpus.manifest["inventory"]
    (inventory,) = on_disk["inventory"]
    assert inventory["kind"] == "site-packages" and inventory["suffixes"] == [".py"]
    assert inventory["roots"] == [{"role": "stdlib", "path": str(stdlib)}, {"role": "purelib", "path": str(site)}]
    assert inventory["distributions"] == [{"name": "Another-Dist", "version": "0.1"},
                                          {"name": "fakepkg", "version": "1.2.3"},
                                          {"name": "six", "version": "1.16.0"}]
    assert inventory["files"] == 3 and inventory["bytes"] == 11 + 18 + 11
    assert inventory["bytes"] == sum(corpus.manifest["splits"][s]["bytes"] for s in SPLITS)
    assert inventory["python"].split()[0] in ("CPython", "PyPy")
    again = prepare("site-packages", fractions=FRACTIONS, progress=False)
    assert not again.rebuilt and again.manifest["inventory"] == on_disk["inventory"]
    (stdlib_inventory,) = prepare(str(stdlib), fractions=(1, 0, 0), progress=False).manifest["inventory"]
    assert stdlib_inventory is None  # other sources record nothing beyond their key


def test_held_out_packages_are_only_in_the_test_split(tmp_path, monkeypatch):
    stdlib, site, roots = venv_machine(tmp_path)
    for i in range(12):
        write(site / "heldpkg" / f"m{i}.py", f"held = {i}\n".encode())
        write(site / "keptpkg" / f"m{i}.py", f"kept = {i}\n".encode())
        write(stdlib / "stdmod" / f"m{i}.py", f"std = {i}\n".encode())
    write(site / "toplevel.py", b"top = 1\n")
    dist_info(site, "Held-Dist", "2.0", ["heldpkg/m0.py", "toplevel.py", "../../../bin/held-script"])
    use_roots(monkeypatch, *roots)
    (plain,) = parse_spec("site-packages")
    before = splits(plain)
    assert {before[f"heldpkg/m{i}.py"] for i in range(12)} == {"train", "test"}  # by the hash of each name
    for spec in ("site-packages:holdout=heldpkg+toplevel", "site-packages:holdout=held_dist"):  # packages, or a distribution
        (held,) = parse_spec(spec)
        after = splits(held)
        moved = {name for name in after if name.startswith("heldpkg/") or name == "toplevel.py"}
        assert len(moved) == 13 and {after[name] for name in moved} == {"test"}
        assert {name: after[name] for name in after if name not in moved} == {
            name: before[name] for name in before if name not in moved}  # nothing else moves
        assert held.inventory()["holdout"]["files"] == 13
        assert held.key != plain.key  # its own cache entry
    assert sorted(held.held) == ["Held_Dist-2.0.dist-info", "heldpkg", "toplevel"]
    corpus = prepare("site-packages:holdout=heldpkg+toplevel", fractions=FRACTIONS, progress=False)
    (inventory,) = corpus.manifest["inventory"]
    assert inventory["holdout"] == {"names": ["heldpkg", "toplevel"], "packages": ["heldpkg", "toplevel"],
                                    "files": 13, "bytes": sum(len(f"held = {i}\n") for i in range(12)) + 8}
    assert corpus.manifest["splits"]["test"]["bytes"] >= inventory["holdout"]["bytes"]
    assert parse_spec("site-packages-text:holdout=heldpkg")[0].holdout == ("heldpkg",)


@pytest.mark.parametrize("spec, message", [
    ("site-packages:holdout=numpyy", "held-out package 'numpyy' is neither"),
    ("site-packages:holdout=heldpkg,torch", "joined by '\\+'"),
    ("site-packages:holdout=heldpkg++torch", "empty package name"),
    ("site-packages:exclude=heldpkg", "unknown option 'exclude=heldpkg'"),
    ("site-packages:holdout", "unknown option 'holdout'"),
])
def test_bad_site_packages_specs(tmp_path, monkeypatch, spec, message):
    stdlib, site, roots = venv_machine(tmp_path)
    write(site / "heldpkg" / "m.py", b"x = 1\n")
    use_roots(monkeypatch, *roots)
    with pytest.raises(DataError, match=message):
        prepare(spec, fractions=FRACTIONS, progress=False)


def test_text_source_holds_only_txt_rst_and_md_files(tmp_path, monkeypatch):
    stdlib, site, roots = venv_machine(tmp_path)
    write(stdlib / "idlelib" / "help.txt", b"IDLE help\n")
    write(stdlib / "idlelib" / "run.py", b"# code\n")
    write(site / "pkg" / "README.md", b"# pkg\n")
    write(site / "pkg" / "docs" / "index.rst", b"Index\n=====\n")
    write(site / "pkg" / "NOTES.TXT", b"IDLE help\n")  # the same bytes as help.txt: kept once
    write(site / "pkg" / "CHANGES.Md", b"changes\n")
    for other in ("data.json", "setup.cfg", "mod.py", "page.html", "README.markdown"):
        write(site / "pkg" / other, b"not prose\n")
    use_roots(monkeypatch, *roots)
    (source,) = parse_spec("site-packages-text")
    assert source.suffixes == SITE_PACKAGES_TEXT and source.label == "site-packages-text"
    assert docs(source) == {"idlelib/help.txt": b"IDLE help\n", "pkg/CHANGES.Md": b"changes\n",
                            "pkg/README.md": b"# pkg\n", "pkg/docs/index.rst": b"Index\n=====\n"}
    assert source.inventory()["skipped"]["duplicate"] == 1
    (code,) = parse_spec("site-packages")
    assert code.key != source.key and set(docs(code)) == {"idlelib/run.py", "pkg/mod.py"}


def test_adding_a_file_or_a_distribution_changes_the_stamp_and_rebuilds(tmp_path, monkeypatch):
    stdlib, site, roots = venv_machine(tmp_path)
    for i in range(6):
        write(site / "pkg" / f"m{i}.py", f"x = {i}\n".encode())
    use_roots(monkeypatch, *roots)
    first = prepare("site-packages", fractions=FRACTIONS, progress=False)
    assert not prepare("site-packages", fractions=FRACTIONS, progress=False).rebuilt
    stamp = parse_spec("site-packages")[0].stamp()
    write(site / "pkg" / "new.py", b"new = 1\n")
    (added,) = parse_spec("site-packages")
    assert added.key == parse_spec("site-packages")[0].key and added.stamp() != stamp
    second = prepare("site-packages", fractions=FRACTIONS, progress=False)
    assert second.rebuilt and second.path == first.path
    assert second.manifest["stamp"] != first.manifest["stamp"]
    assert second.manifest["inventory"][0]["files"] == first.manifest["inventory"][0]["files"] + 1 == 7
    stamp = parse_spec("site-packages")[0].stamp()
    dist_info(site, "pkg", "1.0", [])  # a distribution's metadata alone (an upgrade that changed no .py file)
    assert parse_spec("site-packages")[0].stamp() != stamp
    third = prepare("site-packages", fractions=FRACTIONS, progress=False)
    assert third.rebuilt and third.manifest["inventory"][0]["distributions"] == [{"name": "pkg", "version": "1.0"}]


def test_no_roots_is_an_error():
    with pytest.raises(DataError, match="no standard library"):
        SitePackages([])


def test_real_roots_are_listed():
    """The interpreter's own trees: listed only (names, no reading), which takes a fraction of a second."""
    roots = sources_module.site_packages_roots()
    assert roots[0][0] == "stdlib" and all(path.is_dir() for _, path in roots)
    (source,) = parse_spec("site-packages")
    names = {name for name, _ in source.candidates}
    assert {"os.py", "json/__init__.py", "pytest/__init__.py"} <= names  # the stdlib and the venv's packages
    assert not any("__pycache__" in n or n.startswith(("site-packages/", "dist-packages/")) for n in names)
