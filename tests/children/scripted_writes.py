"""Writes the test tree three times in one process (test_beton.py): the default .beton, a raw one, and one whose
reads fail inside a writer worker; prints RESULT and the exit codes and summary as JSON.

    python -m children.scripted_writes DATA_DIR DEFAULT_OUT RAW_OUT FAILED_OUT RAW_MAX_RES
"""
import contextlib
import io
import json
import sys

import backbone.write_beton as wb

data_dir, default_out, raw_out, failed_out = sys.argv[1:5]
summary = io.StringIO()
with contextlib.redirect_stdout(summary):
    rcs = [wb.main(["--data-dir", data_dir, "--out", default_out, "--skip-bad", "--num-workers", "2"])]
rcs.append(wb.main(["--data-dir", data_dir, "--out", raw_out, "--write-mode", "raw",
                    "--compress-probability", "0", "--max-resolution", sys.argv[5], "--skip-bad",
                    "--num-workers", "2"]))
original = wb.ImageFolderRGB.__getitem__
def failing(self, index):
    if index == 150:
        raise OSError("injected read failure")
    return original(self, index)
wb.ImageFolderRGB.__getitem__ = failing
rcs.append(wb.main(["--data-dir", data_dir, "--out", failed_out, "--skip-bad", "--num-workers", "2",
                    "--chunk-size", "20"]))
print("RESULT", json.dumps({"rcs": rcs, "summary": summary.getvalue()}))
