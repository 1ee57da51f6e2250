"""The files ``tributary-algorithm init`` writes, per language. ``{name}`` is the algorithm's
name; everything else is literal (braces in the templates are doubled)."""

from __future__ import annotations

MANIFEST = """\
# What `tributary algorithm publish` registers at the hub (options on its command line win).
name = "{name}"
version = "0.1.0"
description = "{description}"
# How the hub pools the cases' outputs: summary (every numeric output field),
# binary-classification, nodule-detection (docs/aggregation.md in Tributary).
aggregator = "summary"
arguments_schema = "arguments.schema.json"
"""

GITIGNORE = """\
wheels/
output/
__pycache__/
*.key
"""

SCHEMA_PYTHON = """\
{{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "{name} arguments",
  "type": "object",
  "additionalProperties": false,
  "properties": {{
    "modality": {{
      "type": "string",
      "description": "Only count series of this modality (empty: every series).",
      "default": ""
    }},
    "min_instances": {{
      "type": "integer",
      "minimum": 1,
      "default": 1,
      "description": "A case with fewer instances is unsuitable (exit 3)."
    }}
  }}
}}
"""

SCHEMA_OTHER = """\
{{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "{name} arguments",
  "type": "object",
  "additionalProperties": false,
  "properties": {{}}
}}
"""

MAIN_PYTHON = '''\
"""{name}: a Tributary algorithm (contract v1).

The spoke mounts one de-identified case read-only and runs this script with no network;
whatever `main` returns is written atomically as output.json. Replace the body of `analyse`
with your method and keep the rest.
"""

from __future__ import annotations

from pathlib import Path

from tributary_algorithm import Context, UnsuitableInput, run

SCHEMA = Path(__file__).with_name("arguments.schema.json")


def analyse(ctx: Context) -> dict:
    """The output of one case: numbers the hub can pool across sites."""
    args = ctx.validated_arguments(SCHEMA)  # defaults filled in; exit 2 if invalid
    series = ctx.series_with_modality(args["modality"]) if args["modality"] else ctx.series
    instances = sum(s.instance_count for s in series)
    if instances < args["min_instances"]:
        raise UnsuitableInput(f"{{instances}} instance(s), fewer than {{args['min_instances']}}")
    ctx.report_progress(0.5, "measuring")
    # Reading the pixels: `series[0].datasets()` (pydicom, installed in the image).
    return {{
        "series": len(series),
        "instances": instances,
        "instances_per_series": instances / len(series),
    }}


if __name__ == "__main__":
    run(analyse)
'''

TEST_PYTHON = '''\
"""Runs `analyse` on the sample case without a container: `python -m pytest tests/`.
`tributary-algorithm test .` runs the real image in the spoke's sandbox."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tributary_algorithm import execute, load_context
from tributary_algorithm.tools import prepare_local_debug

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from main import analyse  # noqa: E402


def test_sample_case(tmp_path: Path) -> None:
    algo_arg = prepare_local_debug(HERE / "testdata" / "case-1", tmp_path)
    assert execute(analyse, load_context(algo_arg)) == 0
    output = json.loads((tmp_path / "output" / "output.json").read_text())
    assert output["series"] == 1 and output["instances"] == 2


def test_too_few_instances_is_unsuitable(tmp_path: Path) -> None:
    algo_arg = prepare_local_debug(HERE / "testdata" / "case-1", tmp_path,
                                   arguments={{"min_instances": 100}})
    assert execute(analyse, load_context(algo_arg)) == 3
'''

DOCKERFILE_PYTHON = """\
# {name}: a Tributary algorithm image. `tributary-algorithm build . --tag {name}:dev`
# puts the wheels of the SDK and of requirements.txt in wheels/, so this installs offline.
ARG BASE_IMAGE=python:3.11-slim
FROM ${{BASE_IMAGE}}

ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/algorithm
COPY requirements.txt ./
COPY wheels/ /tmp/wheels/
RUN python3 -m pip install --no-index --find-links /tmp/wheels -r requirements.txt \\
        "tributary-algorithm[dicom]" \\
    && rm -rf /tmp/wheels

COPY main.py arguments.schema.json ./
# At run time the root file system is read-only, /tmp is a small tmpfs, there is no network.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65534:65534
ENTRYPOINT ["python3", "/opt/algorithm/main.py"]
"""

REQUIREMENTS_PYTHON = """\
# Your Python dependencies, one per line (numpy, scipy, ...). `tributary-algorithm build`
# downloads their wheels for the image's Python and CPU; the image installs them offline.
"""

DOCKERFILE_OTHER = """\
# {name}: a Tributary algorithm image in any language. The build has no network: put
# everything the program needs into vendor/ (see README.md) and copy it in.
ARG BASE_IMAGE=python:3.11-slim
FROM ${{BASE_IMAGE}}

WORKDIR /opt/algorithm
COPY vendor/ ./vendor/
COPY run.sh arguments.schema.json ./
USER 65534:65534
ENTRYPOINT ["/bin/sh", "/opt/algorithm/run.sh"]
"""

RUN_OTHER = """\
#!/bin/sh
# {name}: the algorithm contract in POSIX shell. A spoke runs this with ALGO_ARG set (JSON:
# arguments, participant, output), the case's series mounted read-only under
# /tributary/input/ and /tributary/output/ writable. Exit 0 with output.json written,
# 2 for invalid arguments, 3 for an unsuitable case, anything else for an error.
# Replace the counting below with a call to your program (e.g. /opt/algorithm/vendor/bin/x).
set -eu
output_dir=/tributary/output
series=0
instances=0
for folder in /tributary/input/*/; do
    [ -d "$folder" ] || continue
    series=$((series + 1))
    instances=$((instances + $(find "$folder" -type f | wc -l)))
done
if [ "$series" -eq 0 ]; then
    echo "unsuitable input: no series in this case" >&2
    exit 3
fi
# Written next to output.json, then renamed: the spoke never reads half a file.
printf '{{"series": %d, "instances": %d}}\\n' "$series" "$instances" > "$output_dir/.output.tmp"
mv "$output_dir/.output.tmp" "$output_dir/output.json"
"""

VENDOR_README = """\
Everything the program needs at run time goes here (binaries, libraries, packages,
model weights): the image build has no network. See ../README.md.
"""

README = """\
# {name}

A Tributary algorithm ({language}), made by `tributary-algorithm init`.

| file | what |
| --- | --- |
| `{entry}` | the algorithm: reads one case, writes `output.json` |
| `arguments.schema.json` | its arguments (JSON Schema); registered at the hub with it |
| `Dockerfile` | the image; takes `BASE_IMAGE` (`--base-image`), installs offline |
| `algorithm.toml` | name, version, aggregator: what `tributary algorithm publish` registers |
| `testdata/case-1/` | a tiny sample case (one CT series of two 8x8 slices, no patient) |
{extra_rows}
## Try it

```sh
tributary-algorithm test .                       # build, then run on testdata/ like a spoke
tributary-algorithm test . --cohort COHORT_DIR   # one case per patient, de-identified first
tributary algorithm publish .                    # push, sign, register; prints the review link
```
{language_notes}"""

README_ROWS_PYTHON = """\
| `requirements.txt` | Python dependencies (wheels downloaded by `tributary-algorithm build`) |
| `tests/test_main.py` | `python -m pytest tests/` runs `analyse` without a container |
"""

README_ROWS_OTHER = """\
| `run.sh` | the entry point: replace its body with a call to your program |
| `vendor/` | everything your program needs at run time (the build has no network) |
"""

NOTES_OTHER = """
## Dependencies without network

The image is built where the container engine cannot reach a package index, and at run
time there is no network at all. Fetch dependencies on your workstation into `vendor/`
and copy them in; the Dockerfile already does `COPY vendor/ ./vendor/`:

- a compiled program (C, C++, Go, Rust): build a static binary for linux/amd64 (or the
  spokes' architecture) and put it in `vendor/bin/`;
- R: `download.packages(c("pkg"), destdir = "vendor/r")` with a matching R base image, then
  `RUN R CMD INSTALL vendor/r/*.tar.gz`;
- Node.js: `npm ci` on your workstation, copy `node_modules/` into `vendor/`;
- Java: one self-contained jar (`mvn package` with the shade plugin) in `vendor/`;
- Debian packages: `apt-get download pkg` for the base image's release, then
  `RUN dpkg -i vendor/deb/*.deb`.

Choose `BASE_IMAGE` (`tributary-algorithm build --base-image ...`) with the runtime your
program needs, already pulled on the build machine.
"""
