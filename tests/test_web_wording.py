"""What the pages say, from their shared module web/src/common.js run in Node.js (skipped without node or
web/node_modules: ``npm --prefix web ci``)."""

from __future__ import annotations

import pytest
from test_web_geometry import run_node

pytestmark = pytest.mark.unit


def test_the_classifiers_accuracy_is_worded_as_a_self_check_on_the_labels_it_held_out():
    said = run_node("import { selfCheck } from './src/common.js';\n"
                    "console.log(JSON.stringify(input.map(selfCheck)));", [
                        {"val_accuracy": 1.0, "val_labels": 4, "history": [{"n_labels": 20}]},
                        {"val_accuracy": 0.9134, "val_labels": 60, "history": [{"n_labels": 240}]},
                        {"val_accuracy": 0.5, "history": []},  # a provider that does not say how many
                        {"val_accuracy": None, "history": []}])
    assert said == ["self-check on 4 of its own 20 labels: 100%",  # whole percent: 4 labels say little
                    "self-check on 60 of its own 240 labels: 91.3%",
                    "self-check on its own labels: 50%", None]
