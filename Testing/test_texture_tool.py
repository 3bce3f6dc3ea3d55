"""Testing/tools/texture_at_3mm.py measures the bundled model's recipe: it reads it from the
card, so its numbers follow the model rather than a copy of the command."""

from __future__ import annotations

import json

import numpy as np


def test_the_recipe_is_the_cards(load_tool, tmp_path):
    tool = load_tool("texture_at_3mm")
    card = json.loads(tool.CARD.read_text())
    augment, anatomy = tool.recipe()
    mine = json.loads(json.dumps(augment.to_dict()))         # tuples as the card's lists
    assert {k: mine[k] for k in card["training"]["augment"]} == card["training"]["augment"]
    assert anatomy["kidney_rise"] == 20.0 and anatomy["back_sat"] == 1.0   # step 19's command
    # another card, another recipe
    card["training"]["augment"]["randomize"] = 0.3
    card["training"]["command"] = card["training"]["command"].replace("--kidney-rise 20",
                                                                      "--kidney-rise 5")
    other = tmp_path / "card.json"
    other.write_text(json.dumps(card))
    augment, anatomy = tool.recipe(other)
    assert augment.randomize == 0.3 and anatomy["kidney_rise"] == 5.0


def test_local_sd_is_the_3x3_spread(load_tool):
    tool = load_tool("texture_at_3mm")
    x = np.zeros((9, 9), np.float32)
    x[::2, ::2] = 10.0             # around (4, 4) one pixel of nine at 10 HU, the rest 0
    sd = tool.local_sd(x)
    assert abs(sd[4, 4] - 10.0 * np.sqrt(8.0) / 9.0) < 0.01 and tool.local_sd(np.full((9, 9), 7.0, np.float32)).max() < 0.01
