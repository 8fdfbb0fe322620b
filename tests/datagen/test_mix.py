"""Mixing compositional records with a LLaVA-665K-format file."""

from __future__ import annotations

import collections
import json

import pytest

from compact_jax.data import records as records_lib
from compact_jax.datagen import mix
from tests.datagen import helpers


def comp_records(n: int) -> list[dict]:
  return [
    {"id": f"compact_k{1 + i % 3}_{i:04d}", "image": f"coco/{i}.jpg", "k": 1 + i % 3,
     "source": "compact", "conversations": [
       {"from": "human", "value": "<image>\nQ?", "capability": ["color"]},
       {"from": "gpt", "value": "red"}]}
    for i in range(n)
  ]  # fmt: skip


def llava_records(n: int) -> list[dict]:
  out = []
  for i in range(n):
    rec = {"id": f"{i:012d}", "conversations": [{"from": "human", "value": "Hi"},
                                                {"from": "gpt", "value": "Hello"}]}  # fmt: skip
    if i % 4:  # a quarter are text-only, as ShareGPT records in LLaVA-665K
      rec["image"] = f"coco/train2017/{i:012d}.jpg"
      rec["conversations"][0]["value"] = "<image>\nWhat is this?"
    out.append(rec)
  return out


def test_fraction_and_count_give_the_expected_proportions():
  comp, llava = comp_records(320), llava_records(2000)
  mixed = mix.mix_records(comp, llava, seed=0, compositional_count=-1, llava_fraction=0.05,
                          llava_count=-1, llava_source="llava_665k")  # fmt: skip
  by_source = collections.Counter(r["source"] for r in mixed)
  assert by_source == {"compact": 320, "llava_665k": 100}  # 5% of 2000
  mixed = mix.mix_records(comp, llava, seed=0, compositional_count=200, llava_fraction=0.05,
                          llava_count=37, llava_source="llava_665k")  # fmt: skip
  assert collections.Counter(r["source"] for r in mixed) == {"compact": 200, "llava_665k": 37}
  assert len({r["id"] for r in mixed}) == 237  # a subset without replacement
  with pytest.raises(ValueError, match="exceeds"):
    mix.llava_subset_size(10, fraction=0.05, count=11)


def test_mixing_is_seeded_shuffled_and_keeps_records_whole():
  comp, llava = comp_records(50), llava_records(400)
  args = dict(compositional_count=-1, llava_fraction=0.25, llava_count=-1, llava_source="l")
  a = mix.mix_records(comp, llava, seed=3, **args)
  assert a == mix.mix_records(comp, llava, seed=3, **args)
  b = mix.mix_records(comp, llava, seed=4, **args)
  assert [r["id"] for r in a] != [r["id"] for r in b]
  # Shuffled: compositional records are not all in front.
  first = [r["source"] for r in a[:50]]
  assert 0 < first.count("compact") < 50
  originals = {r["id"]: r for r in llava}
  for r in a:
    if r["source"] == "l":
      assert {k: v for k, v in r.items() if k != "source"} == originals[r["id"]]


def test_run_mix_writes_a_buildable_file_and_prints_the_composition(tmp_path, capsys):
  comp = tmp_path / "comp.jsonl"
  records_lib.write_jsonl(comp_records(40), comp)
  llava = tmp_path / "llava_v1_5_mix665k.json"
  llava.write_text(json.dumps(llava_records(200)))  # a JSON array, as the real file
  c = helpers.make_config("world")
  c.mix.compositional = (str(comp),)
  c.mix.llava_file = str(llava)
  c.mix.llava_fraction = 0.1
  out = mix.run_mix(c, tmp_path)
  assert out["by_source"] == {"compact": 40, "llava_665k": 20}
  assert out["by_k"]["none"] == 20 and sum(out["by_k"].values()) == 60
  recs = records_lib.read_records(tmp_path / "mix" / "train.jsonl")
  assert len(recs) == 60
  for i, r in enumerate(recs):
    records_lib.validate_record(r, where=f"#{i}")
  printed = capsys.readouterr().out
  assert "by source: {'compact': 40, 'llava_665k': 20}" in printed


def test_id_collisions_between_inputs_are_an_error(tmp_path):
  comp = tmp_path / "comp.jsonl"
  recs = comp_records(3)
  records_lib.write_jsonl([*recs, recs[0]], comp)
  c = helpers.make_config("world")
  c.mix.compositional = (str(comp),)
  with pytest.raises(ValueError, match="occurs twice"):
    mix.run_mix(c, tmp_path)
