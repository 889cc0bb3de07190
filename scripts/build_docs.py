"""Build the HTML API reference from the docstrings, with pdoc.

    pip install ".[docs]" && python scripts/build_docs.py        # -> docs/reference/index.html

Documents the public names only: ``pyllama_ernie`` (its ``__all__``) and its public
modules (those whose name does not start with ``_``; each module's ``__all__`` says
what it shows). pdoc imports the modules, so the package must be built first
(``pip install .`` also puts the compiled library into the checkout, which this
script documents). The output folder is git-ignored; the guide is docs/api.md.

Exits 1 when a module cannot be imported or pdoc warns, so that a reference with a
module silently left out is not taken for a complete one.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pyllama_ernie"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "reference",
                    help="output folder (default: docs/reference)")
    args = ap.parse_args(argv)

    try:
        import pdoc
        import pdoc.doc
        import pdoc.render
    except ImportError:
        print('error: pdoc is not installed: pip install ".[docs]"', file=sys.stderr)
        return 1

    sys.path.insert(0, str(ROOT))  # the checkout's package, as pytest sees it
    try:
        package = importlib.import_module(PACKAGE)
        importlib.import_module(f"{PACKAGE}._lib")  # loads the compiled library
    except ImportError as e:
        print(f"error: cannot import {PACKAGE} with its compiled library: {e}", file=sys.stderr)
        return 1

    # pdoc follows a package's __all__, which names our top-level objects, not the
    # submodules: list the public modules explicitly, Python source only (the compiled
    # libraries, libllama.so and the like, also look like modules to pkgutil).
    broken: list[str] = []
    found = pkgutil.walk_packages(package.__path__, PACKAGE + ".", onerror=broken.append)
    modules = [PACKAGE] + sorted(
        m.name for m in found
        if not any(part.startswith("_") for part in m.name.split("."))
        and (importlib.util.find_spec(m.name).origin or "").endswith(".py")
    )
    if broken:
        print(f"error: cannot import the packages {', '.join(broken)}", file=sys.stderr)
        return 1
    pdoc.render.configure(
        docformat="google",  # Google-style "Args:" sections, reStructuredText markup (``code``, :class:)
        footer_text=f"{PACKAGE} {package.__version__}",
        show_source=True,
    )
    for old in [*args.output.rglob("*.html"), args.output / "search.js"]:  # pages of removed modules
        old.unlink(missing_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pdoc.pdoc(*modules, output_directory=args.output)
        except RuntimeError as e:  # "Error importing MODULE", caused by the import's exception
            print(f"error: {e}: {e.__cause__!r}", file=sys.stderr)
            return 1
        # index.html: the list of every documented module (pdoc would redirect to the
        # package's page, which lists only the submodules its __all__ names)
        all_modules = {name: pdoc.doc.Module.from_name(name) for name in modules}
        index = pdoc.render.env.get_template("index.html.jinja2").render(
            all_modules=all_modules, root_module_name=None)
        (args.output / "index.html").write_text(index, encoding="utf-8")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    pages = sorted(p.relative_to(args.output).as_posix() for p in args.output.rglob("*.html"))
    print(f"wrote {len(pages)} pages for {len(modules)} modules to {args.output} "
          f"(open {args.output / 'index.html'})")
    return 1 if caught else 0


if __name__ == "__main__":
    sys.exit(main())
