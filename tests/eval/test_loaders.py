"""Every loader on a small fixture in each layout it accepts: VLMEvalKit TSV (base64 images,
index references), Hugging Face parquet (image structs) and the original release files.

Each case writes only the files of one layout, in that layout's real shape (column names
and folder structure as distributed; shared/reference/data_formats_benchmarks_metrics.md
§3.2, lmms-eval 0.7.3's task files), and states the examples it must load: ids, questions,
prompts, options, answers, image bytes and categories, compared whole.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Callable

import pytest

from compact_jax.eval.benchmarks import core, gqa, infovqa, judged, mcq, mme, pope, textvqa
from tests.eval import bench_fixtures as fx
from tests.eval.bench_fixtures import BLUE, GREEN, RED

SA = core.SHORT_ANSWER
E = core.Example
JPEG = fx.jpeg((10, 200, 30))


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]


# --- MME -------------------------------------------------------------------------------------


def mme_tsv(d: pathlib.Path) -> list[E]:
  # VLMEvalKit stores an image once; the second question of the image refers to its row.
  fx.write_tsv(d / "MME.tsv", [
    {"index": 0, "image": fx.b64(RED), "question": "Is it red? Please answer yes or no.",
     "answer": "Yes", "category": "color"},
    {"index": 1, "image": "0", "question": "Is it blue? Please answer yes or no.",
     "answer": "No", "category": "color"},
    {"index": 2, "image": fx.b64(BLUE), "question": "Is the code output 3? Please answer yes or no.",
     "answer": "no", "category": "code_reasoning"},
  ])  # fmt: skip
  red, blue = f"color/{_sha(RED)}", f"code_reasoning/{_sha(BLUE)}"
  return [
    E("0", "Is it red?", "Is it red?" + SA, RED, "yes", {"category": "color", "pair": red}),
    E("1", "Is it blue?", "Is it blue?" + SA, RED, "no", {"category": "color", "pair": red}),
    E("2", "Is the code output 3?", "Is the code output 3?" + SA, BLUE, "no",
      {"category": "code_reasoning", "pair": blue}),
  ]  # fmt: skip


def mme_parquet(d: pathlib.Path) -> list[E]:
  # lmms-lab/MME: question_id is the image path, shared by the image's two questions.
  fx.write_parquet(d / "data" / "test-00000-of-00001.parquet", [
    {"question_id": "code_reasoning/0020.png", "question": "Is the output 5? Please answer yes or no.",
     "answer": "Yes", "category": "code_reasoning", "image": {"bytes": BLUE, "path": "0020.png"}},
    {"question_id": "code_reasoning/0020.png", "question": "Is the output 7? Please answer yes or no.",
     "answer": "No", "category": "code_reasoning", "image": {"bytes": BLUE, "path": "0020.png"}},
  ])  # fmt: skip
  meta = {"category": "code_reasoning", "pair": "code_reasoning/code_reasoning/0020.png"}
  return [
    E("code_reasoning/0020.png#0", "Is the output 5?", "Is the output 5?" + SA, BLUE, "yes", meta),
    E("code_reasoning/0020.png#1", "Is the output 7?", "Is the output 7?" + SA, BLUE, "no", meta),
  ]


def _mme_release(root: pathlib.Path) -> list[E]:
  # Both folder layouts of the release: artwork/ (like celebrity, landmark, posters, scene)
  # keeps images/ and questions_answers_YN/; existence/ keeps each image next to its .txt.
  fx.write_bytes(root / "artwork" / "images" / "10002.jpg", JPEG)
  (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
  (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
    "Is this artwork created by Monet? Please answer yes or no.\tYes\r\n"
    "Is this artwork created by Degas? Please answer yes or no.\tNo\r\n"
  )
  fx.write_bytes(root / "existence" / "000000006040.png", GREEN)
  (root / "existence" / "000000006040.txt").write_text(
    "Is there a train in this image? Please answer yes or no.\tYes\n\n"
  )
  art = {"category": "artwork", "pair": "artwork/artwork/10002.jpg"}
  q1, q2 = "Is this artwork created by Monet?", "Is this artwork created by Degas?"
  q3 = "Is there a train in this image?"
  return [
    E("artwork/10002.jpg#0", q1, q1 + SA, JPEG, "yes", art),
    E("artwork/10002.jpg#1", q2, q2 + SA, JPEG, "no", art),
    E("existence/000000006040.png#2", q3, q3 + SA, GREEN, "yes",
      {"category": "existence", "pair": "existence/existence/000000006040.png"}),
  ]  # fmt: skip


def mme_original(d: pathlib.Path) -> list[E]:
  return _mme_release(d / "MME_Benchmark_release_version")


def mme_original_wrapped(d: pathlib.Path) -> list[E]:
  return _mme_release(d / "MME_Benchmark_release_version" / "MME_Benchmark")


# --- GQA -------------------------------------------------------------------------------------


def gqa_tsv(d: pathlib.Path) -> list[E]:
  fx.write_tsv(d / "GQA_TestDev_Balanced.tsv", [
    {"index": 201307251, "image": fx.b64(RED), "question": "Is the sky dark?", "answer": "yes"},
    {"index": 201640614, "image": "201307251", "question": "Who is holding the bat?", "answer": "batter"},
  ])  # fmt: skip
  return [
    E("201307251", "Is the sky dark?", "Is the sky dark?" + SA, RED, "yes"),
    E("201640614", "Who is holding the bat?", "Who is holding the bat?" + SA, RED, "batter"),
  ]


def gqa_hf(d: pathlib.Path) -> list[E]:
  # lmms-lab/GQA: the questions config names its image; the images config holds it.
  fx.write_parquet(d / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", [
    {"id": "20968379", "imageId": "n288870", "question": "Do the shorts have dark color?",
     "answer": "yes", "fullAnswer": "Yes, the shorts are dark."},
    {"id": "20968380", "imageId": "n161313", "question": "What color is the bus?",
     "answer": "white", "fullAnswer": "The bus is white."},
  ])  # fmt: skip
  fx.write_parquet(d / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", [
    {"id": "n161313", "image": {"bytes": BLUE, "path": None}},
    {"id": "n288870", "image": {"bytes": GREEN, "path": None}},
  ])  # fmt: skip
  return [
    E("20968379", "Do the shorts have dark color?", "Do the shorts have dark color?" + SA, GREEN,
      "yes"),
    E("20968380", "What color is the bus?", "What color is the bus?" + SA, BLUE, "white"),
  ]  # fmt: skip


def gqa_original(d: pathlib.Path) -> list[E]:
  fx.write_json(d / "testdev_balanced_questions.json", {
    "20968380": {"imageId": "n161313", "question": "What color is the bus?", "answer": "white",
                 "fullAnswer": "The bus is white.", "isBalanced": True},
    "20968379": {"imageId": "n288870", "question": "Do the shorts have dark color?",
                 "answer": "yes", "fullAnswer": "Yes, the shorts are dark.", "isBalanced": True},
  })  # fmt: skip
  fx.write_bytes(d / "images" / "n161313.jpg", JPEG)
  fx.write_bytes(d / "images" / "n288870.jpg", RED)
  return [
    E("20968379", "Do the shorts have dark color?", "Do the shorts have dark color?" + SA, RED,
      "yes"),
    E("20968380", "What color is the bus?", "What color is the bus?" + SA, JPEG, "white"),
  ]  # fmt: skip


# --- InfoVQA ------------------------------------------------------------------------------------


def infovqa_tsv(d: pathlib.Path) -> list[E]:
  fx.write_tsv(d / "InfoVQA_VAL.tsv", [
    {"index": 65718, "image": fx.b64(RED), "question": "What percentage use email?",
     "answer": "['42%', '42']"},
    {"index": 65719, "image": fx.b64(BLUE), "question": "Which year?", "answer": "2016"},
  ])  # fmt: skip
  return [
    E("65718", "What percentage use email?", "What percentage use email?" + SA, RED, ["42%", "42"]),
    E("65719", "Which year?", "Which year?" + SA, BLUE, ["2016"]),
  ]


def infovqa_parquet(d: pathlib.Path) -> list[E]:
  fx.write_parquet(d / "InfographicVQA" / "validation-00000-of-00001.parquet", [
    {"questionId": 98313, "question": "How many cases in Texas?", "answers": ["11", "eleven"],
     "answer_type": ["single span"], "image": {"bytes": GREEN, "path": "37313.jpeg"},
     "image_url": "https://example.org/37313.jpeg", "data_split": "val"},
  ])  # fmt: skip
  q = "How many cases in Texas?"
  return [E("98313", q, q + SA, GREEN, ["11", "eleven"])]


def infovqa_original(d: pathlib.Path) -> list[E]:
  fx.write_json(d / "infographicsVQA_val_v1.0_withQT.json", {
    "dataset_name": "infographicVQA", "dataset_split": "val", "dataset_version": "1.0",
    "data": [{"questionId": 65718, "question": "What percentage use email?",
              "image_local_name": "37313.jpeg", "image_url": "https://example.org/37313.jpeg",
              "ocr_output_file": "37313.json", "answers": ["42%"], "data_split": "val",
              "answer_type": ["single span"], "evidence": ["text"], "operation/reasoning": []}],
  })  # fmt: skip
  fx.write_bytes(d / "infographicVQA_val_v1.0_images" / "37313.jpeg", JPEG)
  (d / "infographicVQA_val_v1.0_ocr_outputs").mkdir()  # a sibling folder without the image
  q = "What percentage use email?"
  return [E("65718", q, q + SA, JPEG, ["42%"])]


# --- TextVQA ---------------------------------------------------------------------------------


def textvqa_tsv(d: pathlib.Path) -> list[E]:
  answers = ["nokia"] * 9 + ["toshiba"]
  fx.write_tsv(d / "TextVQA_VAL.tsv", [
    {"index": 34602, "image": fx.b64(RED), "question": "what is the brand of this camera?",
     "answer": repr(answers)},
  ])  # fmt: skip
  q = "what is the brand of this camera?"
  return [E("34602", q, "What is the brand of this camera?" + SA, RED, answers,
            {"ocr_in_prompt": False})]  # fmt: skip


def textvqa_parquet(d: pathlib.Path) -> list[E]:
  fx.write_parquet(d / "data" / "validation-00000-of-00003.parquet", [
    {"image_id": "003a8ae2ef43b901", "question_id": 34602, "question": "what is the brand?",
     "answers": ["nokia"] * 10, "ocr_tokens": ["nokia", "6120"], "image_classes": ["Camera"],
     "image": {"bytes": BLUE, "path": None}},
  ])  # fmt: skip
  return [E("34602", "what is the brand?", "What is the brand?" + SA, BLUE, ["nokia"] * 10,
            {"ocr_in_prompt": False})]  # fmt: skip


def textvqa_original(d: pathlib.Path) -> list[E]:
  fx.write_json(d / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "data": [
    {"question": "what is written on the sign?", "image_id": "003a8ae2ef43b901",
     "image_classes": ["Sign"], "question_id": 34602, "answers": ["stop"] * 10,
     "set_name": "val", "flickr_original_url": "https://example.org/x.jpg"}]})  # fmt: skip
  fx.write_bytes(d / "train_images" / "003a8ae2ef43b901.jpg", JPEG)
  q = "what is written on the sign?"
  return [E("34602", q, "What is written on the sign?" + SA, JPEG, ["stop"] * 10,
            {"ocr_in_prompt": False})]  # fmt: skip


# --- SEED-Bench-2-Plus --------------------------------------------------------------------------

_OPTS = {"A": "Paris", "B": "London", "C": "Rome", "D": "Oslo"}


def seed_tsv(d: pathlib.Path) -> list[E]:
  fx.write_tsv(d / "SEEDBench2_Plus.tsv", [
    {"index": 0, "image": fx.b64(RED), "question": "Which city is marked?", **_OPTS,
     "answer": "C", "category": "map"},
  ])  # fmt: skip
  q = "Which city is marked?"
  prompt = f"{q}\nA. Paris\nB. London\nC. Rome\nD. Oslo" + core.MCQ_SUFFIX
  return [E("0", q, prompt, RED, "C", {"options": _OPTS, "category": "Map"})]


def seed_parquet(d: pathlib.Path) -> list[E]:
  # doolayer/SEED-Bench-2-Plus: choice_A..D and question_image_type (chart/map/web).
  fx.write_parquet(d / "data" / "test-00000-of-00001.parquet", [
    {"question_id": "chart_0001", "question": "What is the highest bar?",
     **{f"choice_{k}": v for k, v in _OPTS.items()}, "answer": "A",
     "question_image_type": "chart", "image": {"bytes": BLUE, "path": None}},
  ])  # fmt: skip
  q = "What is the highest bar?"
  prompt = f"{q}\nA. Paris\nB. London\nC. Rome\nD. Oslo" + core.MCQ_SUFFIX
  return [E("chart_0001", q, prompt, BLUE, "A", {"options": _OPTS, "category": "Chart"})]


# --- MMStar ----------------------------------------------------------------------------------


def mmstar_tsv(d: pathlib.Path) -> list[E]:
  # VLMEvalKit's MMStar.tsv: options as columns, "l2-category" with a hyphen.
  fx.write_tsv(d / "MMStar.tsv", [
    {"index": 3, "question": "Which mood does the image convey?", **_OPTS, "answer": "B",
     "category": "coarse perception", "l2-category": "image emotion", "image": fx.b64(GREEN)},
  ])  # fmt: skip
  q = "Which mood does the image convey?"
  prompt = f"{q}\nA. Paris\nB. London\nC. Rome\nD. Oslo" + mcq.MMSTAR_SUFFIX
  return [E("3", q, prompt, GREEN, "B", {"options": _OPTS, "category": "coarse perception",
                                         "l2_category": "image emotion"})]  # fmt: skip


def mmstar_parquet(d: pathlib.Path) -> list[E]:
  q = "Which option describes the object? Options: A: a red car, B: a blue boat, C: a bus"
  fx.write_parquet(d / "mmstar.parquet", [
    {"index": 7, "question": q, "answer": "B", "category": "fine-grained perception",
     "l2_category": "object counting", "meta_info": {"source": "x"},
     "image": {"bytes": BLUE, "path": None}},
  ])  # fmt: skip
  opts = {"A": "a red car", "B": "a blue boat", "C": "a bus"}
  return [E("7", q, q + mcq.MMSTAR_SUFFIX, BLUE, "B", {"options": opts,
            "category": "fine-grained perception", "l2_category": "object counting"})]  # fmt: skip


# --- CV-Bench --------------------------------------------------------------------------------


def cvbench_tsv(d: pathlib.Path) -> list[E]:
  fx.write_tsv(d / "CV-Bench-2D.tsv", [
    {"index": 0, "image": fx.b64(RED), "question": "How many organs are in the image?",
     "A": "3", "B": "2", "C": "1", "D": "0", "answer": "C", "category": "Count"},
  ])  # fmt: skip
  fx.write_tsv(d / "CV-Bench-3D.tsv", [
    {"index": 0, "image": fx.b64(BLUE), "question": "Which is closer to the camera?",
     "A": "the lamp", "B": "the chair", "C": "nan", "D": "", "answer": "B", "category": "Depth"},
  ])  # fmt: skip
  q1, q2 = "How many organs are in the image?", "Which is closer to the camera?"
  o1, o2 = {"A": "3", "B": "2", "C": "1", "D": "0"}, {"A": "the lamp", "B": "the chair"}
  return [
    E("2D/0", q1, core.mcq_prompt(q1, o1), RED, "C",
      {"options": o1, "type": "2D", "task": "Count", "source": ""}),
    E("3D/0", q2, core.mcq_prompt(q2, o2), BLUE, "B",
      {"options": o2, "type": "3D", "task": "Depth", "source": ""}),
  ]  # fmt: skip


def _cv_rows(image_2d, image_3d) -> list[dict]:
  return [
    {"idx": 0, "type": "2D", "task": "Count", "image": image_2d,
     "question": "How many organs are in the image?", "choices": ["3", "2", "1", "0"],
     "answer": "(C)", "prompt": "How many organs are in the image? Select from the following "
     "choices.\n(A) 3\n(B) 2\n(C) 1\n(D) 0", "filename": "img/2D/count/ade20k_10.png",
     "source": "ADE20K", "source_dataset": "ADE20K Validation Set",
     "source_filename": "ADE_val_00000248.jpg", "target_class": "organ"},
    {"idx": 1438, "type": "3D", "task": "Depth", "image": image_3d,
     "question": "Which is closer to the camera?", "choices": ["lamp", "chair"], "answer": "(B)",
     "prompt": "Which is closer to the camera?\n(A) lamp\n(B) chair",
     "filename": "img/3D/depth/omni3d_sunrgbd_1.png", "source": "Omni3D",
     "source_dataset": "Omni3D-SUNRGBD", "source_filename": "1.jpg", "target_class": None},
  ]  # fmt: skip


def _cv_expected(img_2d: bytes, img_3d: bytes) -> list[E]:
  rows = _cv_rows(None, None)
  return [
    E(f"{r['type']}/{r['idx']}", r["prompt"], r["prompt"] + core.MCQ_SUFFIX, img,
      r["answer"].strip("()"),
      {"options": dict(zip("ABCD", r["choices"])), "type": r["type"], "task": r["task"],
       "source": r["source"]})
    for r, img in zip(rows, (img_2d, img_3d))
  ]  # fmt: skip


def cvbench_parquet(d: pathlib.Path) -> list[E]:
  rows = _cv_rows({"bytes": RED, "path": None}, {"bytes": BLUE, "path": None})
  fx.write_parquet(d / "test_2d.parquet", rows[:1])
  fx.write_parquet(d / "test_3d.parquet", rows[1:])
  fx.write_parquet(d / "test.parquet", rows)  # the default config's copy of both: not read twice
  return _cv_expected(RED, BLUE)


def cvbench_jsonl(d: pathlib.Path) -> list[E]:
  rows = _cv_rows(None, None)
  for r in rows:
    del r["image"]
  fx.write_jsonl(d / "test_2d.jsonl", rows[:1])
  fx.write_jsonl(d / "test_3d.jsonl", rows[1:])
  fx.write_bytes(d / rows[0]["filename"], GREEN)
  fx.write_bytes(d / rows[1]["filename"], JPEG)
  return _cv_expected(GREEN, JPEG)


# --- MM-Vet ----------------------------------------------------------------------------------


def mmvet_tsv(d: pathlib.Path) -> list[E]:
  fx.write_tsv(d / "MMVet.tsv", [
    {"index": 0, "image": fx.b64(RED), "question": "What is x in the equation?",
     "answer": "-1 <AND> -5", "category": "ocr,math"},
  ])  # fmt: skip
  q = "What is x in the equation?"
  return [E("0", q, q, RED, "-1 <AND> -5", {"capabilities": ["ocr", "math"]})]


def mmvet_parquet(d: pathlib.Path) -> list[E]:
  fx.write_parquet(d / "data" / "test-00000-of-00001.parquet", [
    {"question_id": "v1_0", "image": {"bytes": BLUE, "path": None},
     "question": "What is x in the equation?", "answer": "-1 <AND> -5",
     "image_source": "v1_0.png", "capability": ["ocr", "math"]},
  ])  # fmt: skip
  q = "What is x in the equation?"
  return [E("v1_0", q, q, BLUE, "-1 <AND> -5", {"capabilities": ["ocr", "math"]})]


def mmvet_original(d: pathlib.Path) -> list[E]:
  # mm-vet.zip unzips to mm-vet/{mm-vet.json, images/}.
  fx.write_json(d / "mm-vet" / "mm-vet.json", {
    "v1_0": {"imagename": "v1_0.png", "capability": ["ocr", "math"],
             "question": "What is x in the equation?", "answer": "-1 <AND> -5"},
    "v1_1": {"imagename": "v1_1.jpg", "capability": ["rec"], "question": "Which animal? ",
             "answer": "cat"},
  })  # fmt: skip
  fx.write_bytes(d / "mm-vet" / "images" / "v1_0.png", GREEN)
  fx.write_bytes(d / "mm-vet" / "images" / "v1_1.jpg", JPEG)
  q = "What is x in the equation?"
  return [
    E("v1_0", q, q, GREEN, "-1 <AND> -5", {"capabilities": ["ocr", "math"]}),
    E("v1_1", "Which animal?", "Which animal?", JPEG, "cat", {"capabilities": ["rec"]}),
  ]


# --- LLaVA-Bench-in-the-Wild -------------------------------------------------------------------


def llavaw_tsv(d: pathlib.Path) -> list[E]:
  fx.write_tsv(d / "LLaVABench.tsv", [
    {"index": 0, "image": fx.b64(RED), "question": "What is the name of this famous sight?",
     "caption": "A photo of the Diamond Head crater.", "gpt4_ans": "It is Diamond Head.",
     "category": "conv"},
  ])  # fmt: skip
  q = "What is the name of this famous sight?"
  return [E("0", q, q, RED, "It is Diamond Head.",
            {"caption": "A photo of the Diamond Head crater.", "category": "conv"})]  # fmt: skip


def llavaw_parquet(d: pathlib.Path) -> list[E]:
  fx.write_parquet(d / "data" / "train-00000-of-00001.parquet", [
    {"question_id": 0, "question": "Describe the scene.", "image": {"bytes": BLUE, "path": None},
     "caption": "Two cats on a sofa.", "gpt_answer": "Two cats rest on a sofa.",
     "category": "detail", "image_id": "001"},
  ])  # fmt: skip
  return [E("0", "Describe the scene.", "Describe the scene.", BLUE, "Two cats rest on a sofa.",
            {"caption": "Two cats on a sofa.", "category": "detail"})]  # fmt: skip


def llavaw_original(d: pathlib.Path) -> list[E]:
  # liuhaotian/llava-bench-in-the-wild: questions, GPT-4 answers and captions by image.
  fx.write_jsonl(d / "questions.jsonl", [
    {"question_id": 0, "image": "001.jpg", "text": "What is the name of this sight?",
     "category": "conv"},
    {"question_id": 1, "image": "002.jpg", "text": "Describe the photo in detail.",
     "category": "detail"},
  ])  # fmt: skip
  fx.write_jsonl(d / "answers_gpt4.jsonl", [
    {"question_id": 1, "prompt": "Describe the photo in detail.", "text": "A cat sleeps.",
     "answer_id": "b", "model_id": "gpt-4-0314", "metadata": {}},
    {"question_id": 0, "prompt": "What is the name of this sight?", "text": "Diamond Head.",
     "answer_id": "a", "model_id": "gpt-4-0314", "metadata": {}},
  ])  # fmt: skip
  fx.write_jsonl(d / "context.jsonl", [
    {"id": "001", "image": "001.jpg", "caption": "A crater by the sea."},
    {"id": "002", "image": "002.jpg", "caption": ["A cat on a bed.", "The cat sleeps."]},
  ])  # fmt: skip
  fx.write_bytes(d / "images" / "001.jpg", JPEG)
  fx.write_bytes(d / "images" / "002.jpg", RED)
  q1, q2 = "What is the name of this sight?", "Describe the photo in detail."
  return [
    E("0", q1, q1, JPEG, "Diamond Head.", {"caption": "A crater by the sea.", "category": "conv"}),
    E("1", q2, q2, RED, "A cat sleeps.",
      {"caption": "A cat on a bed.\nThe cat sleeps.", "category": "detail"}),
  ]  # fmt: skip


# --- POPE ------------------------------------------------------------------------------------


def pope_tsv(d: pathlib.Path) -> list[E]:
  fx.write_tsv(d / "POPE.tsv", [
    {"index": 0, "image": fx.b64(RED), "question": "Is there a snowboard in the image?",
     "answer": "yes", "category": "adversarial"},
    {"index": 1, "image": "0", "question": "Is there a car in the image?", "answer": "no",
     "category": "random"},
  ])  # fmt: skip
  q1, q2 = "Is there a snowboard in the image?", "Is there a car in the image?"
  return [
    E("0", q1, q1 + SA, RED, "yes", {"split": "adversarial"}),
    E("1", q2, q2 + SA, RED, "no", {"split": "random"}),
  ]


def pope_parquet(d: pathlib.Path) -> list[E]:
  # lmms-lab/POPE's default config: question_id restarts in each split (category).
  fx.write_parquet(d / "data" / "test-00000-of-00001.parquet", [
    {"id": "0", "question_id": "1", "question": "Is there a snowboard in the image?",
     "answer": "yes", "image_source": "COCO_val2014_000000310196", "category": "adversarial",
     "image": {"bytes": BLUE, "path": None}},
    {"id": "3000", "question_id": "1", "question": "Is there a car in the image?",
     "answer": "no", "image_source": "COCO_val2014_000000310196", "category": "popular",
     "image": {"bytes": BLUE, "path": None}},
  ])  # fmt: skip
  q1, q2 = "Is there a snowboard in the image?", "Is there a car in the image?"
  return [
    E("adversarial/1", q1, q1 + SA, BLUE, "yes", {"split": "adversarial"}),
    E("popular/1", q2, q2 + SA, BLUE, "no", {"split": "popular"}),
  ]


def pope_parquet_per_split(d: pathlib.Path) -> list[E]:
  # A copy with one file per split and no category column: the file names the split.
  for split, img in (("random", RED), ("popular", GREEN)):
    fx.write_parquet(d / "Full" / f"{split}-00000-of-00001.parquet", [
      {"question_id": "1", "question": "Is there a dog in the image?", "answer": "no",
       "image": {"bytes": img, "path": None}}])  # fmt: skip
  q = "Is there a dog in the image?"
  return [
    E("popular/1", q, q + SA, GREEN, "no", {"split": "popular"}),
    E("random/1", q, q + SA, RED, "no", {"split": "random"}),
  ]


def pope_original(d: pathlib.Path) -> list[E]:
  for split, label in (("adversarial", "no"), ("random", "yes")):
    fx.write_jsonl(d / f"coco_pope_{split}.json", [
      {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
       "text": "Is there a snowboard in the image?", "label": label}])  # fmt: skip
  fx.write_bytes(d / "val2014" / "COCO_val2014_000000310196.jpg", JPEG)
  q = "Is there a snowboard in the image?"
  return [
    E("adversarial/1", q, q + SA, JPEG, "no", {"split": "adversarial"}),
    E("random/1", q, q + SA, JPEG, "yes", {"split": "random"}),
  ]


# --- the table -------------------------------------------------------------------------------

Loader = Callable[[pathlib.Path, core.Options], list[E]]
CASES: dict[str, tuple[str, Loader, Callable[[pathlib.Path], list[E]]]] = {
  "mme/tsv": ("mme", mme.load, mme_tsv),
  "mme/parquet": ("mme", mme.load, mme_parquet),
  "mme/original": ("mme", mme.load, mme_original),
  "mme/original-wrapped": ("mme", mme.load, mme_original_wrapped),
  "gqa/tsv": ("gqa", gqa.load, gqa_tsv),
  "gqa/parquet": ("gqa", gqa.load, gqa_hf),
  "gqa/original": ("gqa", gqa.load, gqa_original),
  "infovqa/tsv": ("infovqa", infovqa.load, infovqa_tsv),
  "infovqa/parquet": ("infovqa", infovqa.load, infovqa_parquet),
  "infovqa/original": ("infovqa", infovqa.load, infovqa_original),
  "textvqa/tsv": ("textvqa", textvqa.load, textvqa_tsv),
  "textvqa/parquet": ("textvqa", textvqa.load, textvqa_parquet),
  "textvqa/original": ("textvqa", textvqa.load, textvqa_original),
  "seedbench2plus/tsv": ("seedbench2plus", mcq.load_seed, seed_tsv),
  "seedbench2plus/parquet": ("seedbench2plus", mcq.load_seed, seed_parquet),
  "mmstar/tsv": ("mmstar", mcq.load_mmstar, mmstar_tsv),
  "mmstar/parquet": ("mmstar", mcq.load_mmstar, mmstar_parquet),
  "cvbench/tsv": ("cvbench", mcq.load_cvbench, cvbench_tsv),
  "cvbench/parquet": ("cvbench", mcq.load_cvbench, cvbench_parquet),
  "cvbench/jsonl": ("cvbench", mcq.load_cvbench, cvbench_jsonl),
  "mmvet/tsv": ("mmvet", judged.load_mmvet, mmvet_tsv),
  "mmvet/parquet": ("mmvet", judged.load_mmvet, mmvet_parquet),
  "mmvet/original": ("mmvet", judged.load_mmvet, mmvet_original),
  "llava_wild/tsv": ("llava_wild", judged.load_llavaw, llavaw_tsv),
  "llava_wild/parquet": ("llava_wild", judged.load_llavaw, llavaw_parquet),
  "llava_wild/original": ("llava_wild", judged.load_llavaw, llavaw_original),
  "pope/tsv": ("pope", pope.load, pope_tsv),
  "pope/parquet": ("pope", pope.load, pope_parquet),
  "pope/parquet-per-split": ("pope", pope.load, pope_parquet_per_split),
  "pope/original": ("pope", pope.load, pope_original),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loader_reads_the_layout_exactly(case, tmp_path):
  name, load, write = CASES[case]
  bench_dir = tmp_path / name
  bench_dir.mkdir()
  expected = write(bench_dir)
  got = load(bench_dir, core.Options())
  assert got == expected


def test_every_layout_of_every_benchmark_has_a_case(tmp_path):
  """Each layout a loader accepts is the one some case above selects."""
  from compact_jax.eval import benchmarks
  from compact_jax.eval.benchmarks import formats

  layouts = {
    "mme": mme.LAYOUTS, "gqa": gqa.LAYOUTS, "infovqa": infovqa.LAYOUTS,
    "textvqa": textvqa.LAYOUTS, "seedbench2plus": mcq.SEED_LAYOUTS,
    "mmstar": mcq.MMSTAR_LAYOUTS, "cvbench": mcq.CV_LAYOUTS, "mmvet": judged.MMVET_LAYOUTS,
    "llava_wild": judged.LLAVAW_LAYOUTS, "pope": pope.LAYOUTS,
  }  # fmt: skip
  assert set(layouts) | {"tinyworld"} == set(benchmarks.BENCHMARKS)
  selected: dict[str, set[str]] = {name: set() for name in layouts}
  for i, (_case, (name, _, write)) in enumerate(sorted(CASES.items())):
    d = tmp_path / str(i) / name
    d.mkdir(parents=True)
    write(d)
    pattern, _ = formats.load_rows(name, d, layouts[name])
    selected[name].add(pattern)
  for name, ls in layouts.items():
    assert selected[name] == {layout.pattern for layout in ls}, name


def test_mme_release_with_a_stray_folder_names_it(tmp_path):
  root = tmp_path / "mme" / "MME_Benchmark_release_version"
  _mme_release(root)
  (root / "eval_tool").mkdir()
  with pytest.raises(ValueError, match=r"\['eval_tool'\] are not MME subtasks"):
    mme.load(tmp_path / "mme", core.Options())


def test_original_releases_name_the_missing_image(tmp_path):
  d = tmp_path / "llava_wild"
  d.mkdir()
  llavaw_original(d)
  (d / "images" / "002.jpg").unlink()
  with pytest.raises(FileNotFoundError, match=r"questions.jsonl line 2: image .*002.jpg"):
    judged.load_llavaw(d, core.Options())
  d = tmp_path / "infovqa"
  d.mkdir()
  infovqa_original(d)
  (d / "infographicVQA_val_v1.0_images" / "37313.jpeg").unlink()
  with pytest.raises(FileNotFoundError, match=r"data\[0\]: image '37313.jpeg' is in no folder"):
    infovqa.load(d, core.Options())
