"""Re-vendor the chat page's JavaScript libraries from the npm registry: `python ptserve/static/vendor/vendor.py`.

The page is inlined by `ptserve/chatpage.py` (one request, works offline), so each file here is an
upstream minified build with exactly two textual changes that keep the JavaScript identical but let the
HTML parser leave the <script> element alone: `</script` becomes `<\\/script` and `<!--` becomes `<\\!--`
(both appear only inside string and regex literals, where the escape means the same character). Node
checks that every file still parses. highlight.js is its ES core wrapped into a global `hljs` plus the
languages below, not the 37-language "common" build: 90 KB instead of 129 KB.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = {"marked": "18.2.1", "dompurify": "3.4.18", "@highlightjs/cdn-assets": "11.12.0"}
LANGUAGES = (
    "bash c cpp css diff dockerfile go ini java javascript json markdown plaintext python rust shell sql typescript"
    " xml yaml"
).split()
SOURCE_MAP = re.compile(r"\n?//# sourceMappingURL=\S+\s*$")


def inline_safe(js: str) -> str:
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE).replace("<!--", "<\\!--")


def fetch(package: str, version: str, into: Path) -> Path:
    name = subprocess.run(
        ["npm", "pack", f"{package}@{version}", "--silent"], cwd=into, check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    dest = into / name.removesuffix(".tgz")
    with tarfile.open(into / name) as tar:
        tar.extractall(dest, filter="data")
    return dest / "package"


def main() -> None:
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        roots = {p: fetch(p, v, Path(tmp)) for p, v in PACKAGES.items()}
        marked = SOURCE_MAP.sub("", (roots["marked"] / "lib/marked.umd.js").read_text())
        purify = SOURCE_MAP.sub("", (roots["dompurify"] / "dist/purify.min.js").read_text())
        hl = roots["@highlightjs/cdn-assets"]
        core = (hl / "es/core.min.js").read_text()
        core, n = re.subn(r"export\s*\{\s*(\w+)\s+as\s+default\s*\}\s*;?\s*$", r"return \1;", core)
        if n != 1:
            sys.exit("highlight.js core: its ES export changed shape; update vendor.py")
        langs = "".join((hl / f"languages/{lang}.min.js").read_text() + "\n" for lang in LANGUAGES)
        highlight = f"var hljs=(()=>{{{core}}})();\n{langs}"
        files = {"marked.min.js": marked, "purify.min.js": purify, "highlight.min.js": highlight}
        for name, text in files.items():
            (HERE / name).write_text(inline_safe(text.strip()) + "\n")
            subprocess.run(["node", "--check", str(HERE / name)], check=True)
        licences = [
            ("marked", roots["marked"] / "LICENSE"),
            ("DOMPurify (used under Apache-2.0)", roots["dompurify"] / "LICENSE"),
            ("highlight.js", hl / "LICENSE"),
        ]
        (HERE / "LICENSES.txt").write_text(
            "\n\n".join(f"==== {title} ====\n\n{path.read_text().strip()}" for title, path in licences) + "\n"
        )
        for package, version in PACKAGES.items():
            meta = json.loads((roots[package] / "package.json").read_text())
            notes.append((package, version, meta.get("license")))
    sums = {name: hashlib.sha256((HERE / name).read_bytes()).hexdigest()[:16] for name in files}
    print(json.dumps({"packages": notes, "sha256": sums}, indent=1))


if __name__ == "__main__":
    main()
