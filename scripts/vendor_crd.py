"""Write an upstream CustomResourceDefinition (YAML, as the project publishes it) into the package as
JSON: the same document, which the provider and the emulator read in milliseconds where the YAML
took about a second per process (the two CRDs are 2 MB each). JSON is YAML too: ``kubectl apply -f``
takes the file as it is.

    python scripts/vendor_crd.py ../shared/reference/kserve/serving.kserve.io_inferenceservices.yaml \
        airflow_provider_modeldeploy/kserve/serving.kserve.io_inferenceservices.json

Prints the source's sha256, for the note beside ``CRD_PATH`` that says where the file came from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import yaml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the upstream CRD, YAML")
    parser.add_argument("target", type=Path, help="the package's copy, JSON")
    args = parser.parse_args()
    data = args.source.read_bytes()
    crd = yaml.safe_load(data)
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        print(f"{args.source}: not one CustomResourceDefinition", file=sys.stderr)
        return 1
    # One key or item per line: a later upstream release shows as a readable diff.
    args.target.write_text(json.dumps(crd, indent=1, ensure_ascii=False) + "\n")
    print(
        f"{args.target}: {crd['metadata']['name']} from {args.source.name} (sha256 {hashlib.sha256(data).hexdigest()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
