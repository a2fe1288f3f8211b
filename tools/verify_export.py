#!/usr/bin/env python
"""Verify an export against its BF16 reference with the consumers' own readers.

    python tools/verify_export.py --reference runs/tiny-moe/hf --export runs/tiny-moe/export/int4
    python tools/verify_export.py --reference REF --export EXP --no-logits     # big models: tensors only

Checks (see int4_qat/export/verify.py): compressed-tensors decompression (or transformers' gpt-oss
MXFP4 dequant) of every packed tensor == scheme.fake_quantize(reference) bit-exactly; every other
tensor byte-identical; no missing / extra tensors; ignore list matched by compressed-tensors; for
small models, transformers loads the export and its logits match the fake-quantized reference.
Prints a table; exit status 1 on any mismatch (including a structurally broken reference or an
export whose metadata was edited), 2 on unusable input (one ``verify_export: error:`` line).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from int4_qat.cli import add_debug_flag, cli_main, positive_float  # noqa: E402  (light: stdlib only)


@cli_main("verify_export")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--reference", required=True, help="the HF BF16 checkpoint the export was made from")
    p.add_argument("--export", required=True, help="the export dir (tools/export.py output)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--logits", dest="logits", action="store_true", default=None, help="always compare logits")
    g.add_argument("--no-logits", dest="logits", action="store_false", help="skip the transformers load")
    p.add_argument("--logit-tol", type=positive_float, default=1e-4)
    add_debug_flag(p)
    a = p.parse_args(argv)
    from int4_qat.export.verify import verify_export

    report = verify_export(a.reference, a.export, logits=a.logits, logit_tol=a.logit_tol)
    print(report.table())
    print("PASS" if report.ok else "FAIL")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
