"""Benchmark metrics against lmms-eval 0.7.3's own files and hand-derived goldens; loaders on
fixture files of every format; the LLM judge against a loopback server; the suite end to end.

lmms-eval reference files are read from an installed ``lmms_eval`` (``pip install --no-deps
lmms-eval==0.7.3``) or from its wheel (``$LMMS_EVAL_WHEEL``, default /tmp/lm/*.whl) and loaded
BY FILE PATH (their package ``__init__`` needs torch). ``loguru`` is stubbed for the two files
that log with it; nothing else is faked. Without either source those cross-checks FAIL (the
README's test command installs it); the hand-derived goldens always run.
"""

from __future__ import annotations

import ast
import base64
import copy
import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import pathlib
import sys
import types
import zipfile

import pytest
from PIL import Image

from compact_jax.eval.benchmarks import (
  core,
  formats,
  gqa,
  infovqa,
  judge,
  judged,
  mcq,
  mme,
  pope,
  textvqa,
  yesno,
)
from tests.datagen.fake_server import FakeVLMServer
from tests.eval import bench_fixtures as fx
from tests.eval.bench_fixtures import BLUE, RED

LMMS_VERSION = "0.7.3"
KEY_ENV = "COMPACT_JAX_TEST_JUDGE_KEY"


# --- lmms-eval reference files, by path ----------------------------------------------------------


def _lmms_source(member: str) -> str | None:
  spec = importlib.util.find_spec("lmms_eval")
  if spec is not None and spec.submodule_search_locations:
    path = pathlib.Path(next(iter(spec.submodule_search_locations))).parent / member
    if path.exists():
      return path.read_text()
  wheels = glob.glob(os.environ.get("LMMS_EVAL_WHEEL", f"/tmp/lm/lmms_eval-{LMMS_VERSION}-*.whl"))
  if wheels:
    with zipfile.ZipFile(wheels[0]) as z:
      if member in z.namelist():
        return z.read(member).decode()
  return None


@pytest.fixture(scope="module")
def lmms(tmp_path_factory):
  """name -> module loaded from lmms-eval's file (spec_from_file_location, no package import)."""
  root = tmp_path_factory.mktemp("lmms")
  files = {
    "vqa": "lmms_eval/tasks/_task_utils/vqa_eval_metric.py",
    "mcq": "lmms_eval/tasks/_task_utils/mcq_extract.py",
    "mme": "lmms_eval/tasks/mme/utils.py",
    "pope": "lmms_eval/tasks/pope/utils.py",
    "cv": "lmms_eval/tasks/cv_bench/utils.py",
    "metrics": "lmms_eval/api/metrics.py",
  }
  stub = types.ModuleType("loguru")
  stub.logger = types.SimpleNamespace(info=lambda *a, **k: None, error=lambda *a, **k: None)
  saved = sys.modules.get("loguru")
  sys.modules["loguru"] = stub
  mods = {}
  try:
    for name, member in files.items():
      src = _lmms_source(member)
      if src is None:
        pytest.fail(
          f"lmms-eval {LMMS_VERSION} is neither installed nor in $LMMS_EVAL_WHEEL: run "
          f"`pip install --no-deps lmms-eval=={LMMS_VERSION}` (the README's test command does)"
        )
      if name == "metrics":
        # anls sits behind registry decorators whose imports need torch: take its two
        # functions from the file's source, undecorated.
        tree = ast.parse(src)
        keep = [n for n in tree.body if isinstance(n, ast.FunctionDef)
                and n.name in ("levenshtein_distance", "anls")]  # fmt: skip
        for n in keep:
          n.decorator_list = []
        mod = types.ModuleType("lmms_anls")
        exec(compile(ast.Module(keep, []), member, "exec"), mod.__dict__)
      else:
        path = root / f"{name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"lmms_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
      mods[name] = mod
  finally:
    if saved is None:
      sys.modules.pop("loguru", None)
    else:
      sys.modules["loguru"] = saved
  return mods


# --- yes/no: MME and POPE --------------------------------------------------------------------------

YES_NO_GOLDEN = {
  "Yes": "yes", "yes.": "yes", "Yes, there is a dog.": "yes", " NO ": "no", "No.": "no",
  "no, it is not": "no", "y": "yes", "N": "no", "notice": "other", "nothing here": "other",
  "none": "other", "I cannot tell": "other", "": "other", "Yesterday": "other",
}  # fmt: skip


def test_yes_no_parsing_golden_and_lmms_agreement(lmms):
  for text, want in YES_NO_GOLDEN.items():
    assert yesno.parse_yes_no(text) == want, text
  # Where lmms-eval's MME parser is right, we agree with it...
  for text in ("Yes", "yes.", "No.", " NO ", "y", "N", "Yes, there is a dog.", "no, it is not"):
    assert yesno.parse_yes_no(text) == lmms["mme"].parse_pred_ans(text), text
  # ...and where it reads "no" inside a word, we deliberately do not (VLMEvalKit #73).
  for text in ("notice", "nothing here", "none"):
    assert lmms["mme"].parse_pred_ans(text) == "no" and yesno.parse_yes_no(text) == "other"


def _mme_examples():
  # 2 subtasks x 2 images x 2 questions; answers alternate yes/no.
  exs = []
  for cat in ("color", "code_reasoning"):
    for img in range(2):
      for q in range(2):
        exs.append(core.Example(f"{cat}{img}{q}", "q", "q", b"", "yes" if q == 0 else "no",
                                {"category": cat, "pair": f"{cat}/{img}"}))  # fmt: skip
  return exs


def test_mme_acc_plus_and_sums_match_lmms_and_hand(lmms):
  exs = _mme_examples()
  outputs = ["Yes", "No", "Yes", "notice", "yes.", "no", "no", "No"]
  scores = [mme.score(e, o) for e, o in zip(exs, outputs)]
  got = mme.aggregate(exs, scores)
  # color: 3/4 right, 1 of 2 images fully right -> 75 + 50; code_reasoning: 3/4, 1/2 -> 125.
  assert got["subtasks"]["color"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "n": 4}
  assert got["perception"] == 125.0 and got["cognition"] == 125.0 and got["headline"] == 125.0
  # lmms-eval's aggregation of the same per-question scores (our parser's verdicts).
  rows = [{"question_id": e.meta["pair"], "category": e.meta["category"], "score": s.score}
          for e, s in zip(exs, scores)]  # fmt: skip
  assert lmms["mme"].mme_aggregate_results([r for r in rows if r["category"] == "color"]) == 125.0
  # lmms-eval's own parser would score "notice" as a correct "no".
  assert lmms["mme"].parse_pred_ans("notice") == exs[3].answer


def test_pope_metrics_match_lmms_on_clean_answers_and_fix_its_bugs(lmms):
  golds = ["yes", "yes", "no", "no", "yes", "no", "yes", "no"]
  preds = ["yes", "no", "no", "yes", "yes", "no", "yes", "yes"]
  got = pope.binary_metrics(preds, golds)
  rows = [
    {"prediction": p, "ground_truth": g, "score": float(p == g)} for p, g in zip(preds, golds)
  ]
  L = lmms["pope"]
  assert got["accuracy"] == pytest.approx(100 * L.pope_aggregate_accuracy(rows))
  assert got["precision"] == pytest.approx(100 * L.pope_aggregate_precision(rows))
  assert got["recall"] == pytest.approx(100 * L.pope_aggregate_recall(rows))
  assert got["f1"] == pytest.approx(100 * L.pope_aggregate_f1_score(rows))
  # Hand: tp=3 fp=2 fn=1 -> P=3/5, R=3/4, F1=2/3; predicted yes 5/8.
  assert got["f1"] == pytest.approx(200 / 3) and got["yes_ratio"] == 62.5
  assert L.pope_aggregate_yes_ratio(rows) == 0.5  # lmms-eval's yes-ratio is the ground truth's
  # "Yes." is right here; lmms-eval's exact match calls it wrong.
  ex = core.Example("1", "q", "q", b"", "yes", {"split": "random"})
  assert pope.score(ex, "Yes.").score == 1.0
  assert (
    L.pope_process_results({"question_id": 1, "answer": "yes"}, ["Yes."])["pope_accuracy"]["score"]
    == 0.0
  )
  # An unparseable answer to a yes question is a false negative (lmms-eval drops it).
  assert pope.binary_metrics(["yes", "maybe"], ["yes", "yes"])["recall"] == 50.0


# --- multiple choice --------------------------------------------------------------------------------

OPTS = {"A": "red", "B": "Paris", "C": "blue car", "D": "car"}
MCQ_GOLDEN = {
  "A": "A", "(B)": "B", "C.": "C", "D)": "D", "B. Paris": "B", "(C) blue car": "C",
  "The answer is D.": "D", "The correct option is (B).": "B", "Paris": "B", "paris.": "B",
  "It is a blue car.": "C", "The car": "D", "Option C": "C", "Red": "A", "E": "", "notice": "",
  "I don't know": "",
}  # fmt: skip


def test_option_extraction_golden_and_lmms_agreement(lmms):
  for text, want in MCQ_GOLDEN.items():
    assert mcq.extract_option(text, OPTS) == want, text
  agree = ("A", "(B)", "C.", "D)", "B. Paris", "(C) blue car", "The answer is D.")
  for text in agree:
    assert mcq.extract_option(text, OPTS) == lmms["mcq"].extract_mcq_answer(text, list("ABCD")), (
      text
    )
    assert mcq.extract_option(text, OPTS) == lmms["cv"]._extract_answer_letter(
      text
    ) or text.startswith("The")
  # Option text instead of a letter: lmms-eval cannot read it (deliberate difference).
  assert lmms["mcq"].extract_mcq_answer("Paris", list("ABCD")) != "B"
  assert lmms["cv"]._extract_answer_letter("Paris") != "B"


def test_mcq_aggregates_hand_computed():
  exs = [core.Example(str(i), "q", "q", b"", "A", {"options": OPTS, "category": c, "l2_category": l2,
         "type": t, "task": "count", "source": s})
         for i, (c, l2, t, s) in enumerate([("x", "x1", "2D", "ADE20K"), ("x", "x2", "2D", "COCO"),
                                            ("y", "y1", "3D", "Omni3D"), ("y", "y1", "3D", "Omni3D")])]  # fmt: skip
  scores = [mcq.score(e, o) for e, o in zip(exs, ["A", "B", "red", "C"])]
  star = mcq.aggregate_mmstar(exs, scores)
  assert star["accuracy"] == 50.0
  assert star["headline"] == pytest.approx((100 + 0 + 50) / 3)  # mean of l2 means
  cv = mcq.aggregate_cvbench(exs, scores)
  assert cv["headline"] == pytest.approx(((100 + 0) / 2 + 50) / 2) and cv["accuracy"] == 50.0


# --- TextVQA, InfoVQA, GQA ------------------------------------------------------------------------

VQA_NORMALISE = [
  "Two dogs.",
  "the RED car",
  "It's 3,000",
  "don't",
  "dont",
  "a.b",
  "yes!",
  "one hundred",
  "Coca-Cola",
  "50%",
  "(left)",
  "3.5",
  "mr. smith",
  "isnt",
  "The end.",
  "x/y",
  "  spaced   out ",
]


def test_vqa_normalisation_is_bit_exact_with_evalai(lmms):
  ref = lmms["vqa"].EvalAIAnswerProcessor()
  for text in VQA_NORMALISE:
    assert textvqa.normalize_vqa(text) == ref(text), text
  assert textvqa.normalize_vqa("Two dogs.") == "2 dogs"
  assert textvqa.normalize_vqa("isnt") == "isn't"


def test_vqa_accuracy_leave_one_out_hand_computed():
  # 2 of 10 humans said "two": each left-out subset has 1 or 2 matches ->
  # (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
  answers = ["2", "two"] + ["3"] * 8
  assert textvqa.vqa_accuracy("Two.", answers) == pytest.approx(0.6)
  assert textvqa.vqa_accuracy("3", answers) == 1.0  # >= 3 matches in every subset
  # 3 matches: subsets leaving one of them out have 2 -> (3 * 2/3 + 7 * 1) / 10.
  assert textvqa.vqa_accuracy("a cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
  assert textvqa.vqa_accuracy("bird", ["cat"] * 10) == 0.0


def test_anls_matches_lmms_including_the_half_boundary(lmms):
  cases = [
    ("hello", ["hello"]), ("Hello ", ["hello"]), ("helo", ["hello"]), ("abcd", ["abef"]),
    ("abc", ["abcdef"]), ("ab", ["abcdef"]), ("", ["x"]), ("New  York", ["new york", "NYC"]),
    ("1,234", ["1234"]), ("xyz", ["abc", "xyq"]),
  ]  # fmt: skip
  for pred, answers in cases:
    want = lmms["metrics"].anls(answers, [pred])["anls"]
    assert infovqa.anls(pred, answers) == pytest.approx(want), (pred, answers)
  assert infovqa.anls("abcd", ["abef"]) == 0.5  # NL exactly 0.5: kept (the RRC script)
  assert infovqa.anls("abc", ["abcdef"]) == 0.5
  assert infovqa.anls("ab", ["abcdef"]) == 0.0  # 1 - 4/6 < 0.5: zeroed


def test_gqa_exact_match_golden():
  assert gqa.normalize_gqa("Yes.") == "yes"
  assert gqa.normalize_gqa(" Left\n") == "left"
  ex = core.Example("1", "q", "q", b"", "no")
  assert gqa.score(ex, "No.").score == 1.0 and gqa.score(ex, "not").score == 0.0
  assert gqa.normalize_gqa("t-shirt") == gqa.normalize_gqa(
    "tshirt"
  )  # HF evaluate's punctuation rule


# --- loaders on fixture files ---------------------------------------------------------------------


def test_vlmevalkit_tsv_with_base64_and_index_references(tmp_path):
  b64 = base64.b64encode(RED).decode()
  fx.write_tsv(tmp_path / "mme" / "MME.tsv", [
    {"index": 0, "image": b64, "question": "Is it red? Please answer yes or no.", "answer": "Yes", "category": "color"},
    {"index": 1, "image": "0", "question": "Is it blue? Please answer yes or no.", "answer": "No", "category": "color"},
  ])  # fmt: skip
  exs = mme.load(tmp_path / "mme", core.Options())
  assert [e.image for e in exs] == [RED, RED]  # the second row refers to the first's image
  assert exs[0].prompt == "Is it red?" + core.SHORT_ANSWER
  assert exs[0].meta["pair"] == exs[1].meta["pair"] and [e.answer for e in exs] == ["yes", "no"]


def test_hf_parquet_with_image_structs(tmp_path):
  fx.write_parquet(tmp_path / "mmstar" / "mmstar.parquet", [
    {"index": 7, "question": "Which color? Options: A: red, B: blue, C: green, D: gray",
     "answer": "B", "category": "coarse perception", "l2_category": "image style & quality",
     "image": {"bytes": BLUE, "path": None}},
  ])  # fmt: skip
  (ex,) = mcq.load_mmstar(tmp_path / "mmstar", core.Options())
  assert ex.image == BLUE and ex.id == "7" and ex.answer == "B"
  assert ex.meta["options"] == {"A": "red", "B": "blue", "C": "green", "D": "gray"}
  assert ex.prompt.endswith("\nAnswer with the option's letter from the given choices directly")
  fx.write_parquet(tmp_path / "textvqa" / "data" / "validation-00000-of-00001.parquet", [
    {"question_id": 3, "question": "what brand?", "answers": ["Nike"] * 10,
     "ocr_tokens": ["nike", "run"], "image": {"bytes": RED, "path": "x.jpg"}},
  ])  # fmt: skip
  (plain,) = textvqa.load(tmp_path / "textvqa", core.Options())
  (ocr,) = textvqa.load(tmp_path / "textvqa", core.Options(textvqa_ocr=True))
  assert plain.prompt == "What brand?" + core.SHORT_ANSWER and not plain.meta["ocr_in_prompt"]
  assert ocr.prompt == "What brand?\nReference OCR token: nike, run" + core.SHORT_ANSWER


def test_original_json_releases(tmp_path):
  d = tmp_path / "pope"
  (d / "val2014").mkdir(parents=True)
  (d / "val2014" / "a.jpg").write_bytes(RED)
  (d / "coco_pope_adversarial.json").write_text(
    json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "no"})
    + "\n"
  )
  (ex,) = pope.load(d, core.Options())
  assert ex.image == RED and ex.meta["split"] == "adversarial" and ex.answer == "no"
  d = tmp_path / "textvqa"
  (d / "train_images").mkdir(parents=True)
  (d / "train_images" / "img1.jpg").write_bytes(BLUE)
  (d / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
    {"question_id": 9, "question": "what is written?", "image_id": "img1", "answers": ["stop"] * 10}]}))  # fmt: skip
  (ex,) = textvqa.load(d, core.Options())
  assert ex.image == BLUE and ex.answer == ["stop"] * 10
  with pytest.raises(ValueError, match="textvqa_ocr is set but this format has no ocr_tokens"):
    textvqa.load(d, core.Options(textvqa_ocr=True))


def test_missing_data_names_files_places_and_sources(tmp_path):
  with pytest.raises(formats.MissingData) as e:
    mcq.load_cvbench(tmp_path / "cvbench", core.Options())
  msg = str(e.value)
  assert str(tmp_path / "cvbench") in msg and "CV-Bench-[23]D.tsv" in msg
  assert "huggingface.co/datasets/nyu-visionx/CV-Bench" in msg and "Nothing is downloaded" in msg
  assert isinstance(e.value, FileNotFoundError)


def test_bad_rows_name_the_file_and_row(tmp_path):
  fx.write_tsv(tmp_path / "pope" / "POPE.tsv", [
    {"index": 0, "image": base64.b64encode(RED).decode(), "question": "q", "answer": "maybe", "category": "random"}])  # fmt: skip
  with pytest.raises(
    ValueError, match=r"POPE.tsv row 2 \(index 0\): the reference answer must be yes or no"
  ):
    pope.load(tmp_path / "pope", core.Options())


# --- the judge, against a loopback server ------------------------------------------------------------


class JudgeServer(FakeVLMServer):
  """Grades like a judge: MM-Vet "1.0" if the prediction contains the truth, else "0.0";
  LLaVA-W "8 <n>" with n = the prediction's length in words (capped at 10). A prediction
  containing GARBAGE gets prose, FAIL gets HTTP 500 every time. Unlike its base it takes
  requests with or without an image (OpenAI and Gemini protocols) and records which."""

  def _handle(self, path, headers, body):
    if path.endswith("/chat/completions"):
      parts = body["messages"][1]["content"]
      system = body["messages"][0]["content"]
      user = next(p["text"] for p in parts if p["type"] == "text")
      urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
      image = base64.b64decode(urls[0].split(",", 1)[1]) if urls else None
    elif ":generateContent" in path:
      parts = body["contents"][0]["parts"]
      system = body["systemInstruction"]["parts"][0]["text"]
      user = next(p["text"] for p in parts if "text" in p)
      data = [p["inlineData"]["data"] for p in parts if "inlineData" in p]
      image = base64.urlsafe_b64decode(data[0] + "=" * (-len(data[0]) % 4)) if data else None
    else:
      return 404, {}, {"error": {"message": f"no route {path}"}}
    failing = "| FAIL |" in user or "[Assistant 2]\nFAIL" in user
    with self._lock:
      self.requests.append({"kind": "fail" if failing else "ok", "user": user,
                            "image_sha": hashlib.sha256(image).hexdigest() if image else None})  # fmt: skip
    if failing:
      return 500, {}, {"error": {"code": 500, "message": "scripted 500", "status": "INTERNAL"}}
    text = self._reply("", system, user, image, "")
    if path.endswith("/chat/completions"):
      return 200, {}, {
        "id": "chatcmpl-judge", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
      }  # fmt: skip
    return 200, {}, {
      "candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                      "finishReason": "STOP", "index": 0}],
      "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 2, "totalTokenCount": 12},
      "responseId": "gem-judge",
    }  # fmt: skip

  def _reply(self, kind, system, user, image, fault):
    if user.startswith("Question:") and "capabilities" in system:  # the k-tagger
      q = user.removeprefix("Question: ")
      if "GARBAGE" in q:
        return "I think it needs a few things."
      return json.dumps({"capabilities": [c for c in ("color", "counting", "shape") if c in q]})
    if "[Assistant 2]" in user:
      pred = user.split("[Assistant 2]\n", 1)[1].split("\n\n[End of", 1)[0]
      if "GARBAGE" in pred:
        return "Both answers are fine."
      return f"8 {min(10, len(pred.split()))}\nAssistant 2 is shorter."
    line = user.rstrip().splitlines()[-1]  # "question | truth | prediction |"
    _, truth, pred, _ = [s.strip() for s in line.split("|")]
    if "GARBAGE" in pred:
      return "The prediction is partially right."
    return "1.0" if truth.lower() in pred.lower() else "0.0 wrong"


def llm_test_config(url: str, *, structured: bool = False):
  from configs import eval as eval_config

  c = eval_config.llm_config("openai", model="judge-test", structured_output=structured)
  c.backend.base_url = url + "/v1"
  c.backend.api_key_env = KEY_ENV
  c.backend.request_timeout_s = 2.0
  c.datagen.backoff_initial_s = 0.01
  c.datagen.backoff_max_s = 0.02
  c.datagen.max_retries_per_request = 2
  c.datagen.requests_per_minute = 0.0
  return c


def _judged_examples(n_img: int = 1):
  return [core.Example(f"q{i}", f"What is shown {i}?", f"What is shown {i}?", RED if i % 2 else BLUE,
                       ans, {"capabilities": caps, "caption": "a red square", "category": cat})
          for i, (ans, caps, cat) in enumerate([("cat", ["rec"], "conv"), ("dog", ["rec", "ocr"], "detail"),
                                                ("sun", ["know"], "conv"), ("moon", ["ocr"], "complex"),
                                                ("tree", ["rec"], "conv")])]  # fmt: skip


def test_judge_scores_malformed_and_failures_never_become_zero(tmp_path, monkeypatch):
  monkeypatch.setenv(KEY_ENV, "sk-judge-test")
  exs = _judged_examples()
  outputs = ["a cat", "GARBAGE", "FAIL", "the moon", "a bush"]
  with JudgeServer() as srv:
    client = judge.LLMClient(llm_test_config(srv.url), tmp_path / "cache.sqlite")
    scores = judged.judge_mmvet(exs, outputs, client, reasks=1)
    first_requests = len(srv.requests)
    again = judged.judge_mmvet(exs, outputs, client, reasks=1)
    cached_requests = len(srv.requests) - first_requests
  assert [s.score for s in scores] == [1.0, None, None, 1.0, 0.0]
  assert scores[1].extra["judge_error"].startswith("unparseable judge reply")
  assert (
    "scripted 500" in scores[2].extra["judge_error"]
    or "server_error" in scores[2].extra["judge_error"]
  )
  assert scores[0].extra["judge"]["model"] == "judge-test"
  assert scores[0].extra["prompt_version"] == judged.PROMPT_VERSIONS["mmvet"]
  metrics = judged.aggregate_mmvet(exs, scores)
  assert metrics["total"] == pytest.approx(100 * 2 / 3)  # 3 judged; the 2 missing are not zeros
  assert metrics["missing"] == 2 and metrics["judged"] == 3
  assert metrics["by_capability"]["rec"] == {"score": 50.0, "n": 2}
  # Re-run: good and malformed replies come from the cache; only the failing one is retried.
  assert [s.score for s in again] == [s.score for s in scores]
  assert (
    all(r.get("kind") == "fail" for r in srv.requests[first_requests:]) and cached_requests == 3
  )


def test_llava_wild_relative_score_hand_computed(tmp_path, monkeypatch):
  monkeypatch.setenv(KEY_ENV, "sk-judge-test")
  exs = _judged_examples()
  outputs = ["one two three four", "GARBAGE", "one two", "FAIL", "a b c d e f"]
  with JudgeServer() as srv:
    client = judge.LLMClient(llm_test_config(srv.url), None)
    scores = judged.judge_llavaw(exs, outputs, client, reasks=0)
  m = judged.aggregate_llavaw(exs, scores)
  # Judged pairs (8, 4), (8, 2), (8, 6): relative = 100 * 4 / 8 = 50.
  assert m["headline"] == pytest.approx(50.0) and m["missing"] == 2
  assert m["by_category"]["conv"]["relative"] == pytest.approx(100 * (4 + 2 + 6) / 3 / 8)
  assert m["overall"]["reference_x10"] == pytest.approx(80.0)


def llm_test_config_for(backend: str, url: str):
  c = llm_test_config(url)
  if backend == "gemini":
    from configs import eval as eval_config

    c = eval_config.llm_config("gemini", model="judge-test", structured_output=False)
    c.backend.base_url = url
    c.backend.api_key_env = KEY_ENV
    c.backend.request_timeout_s = 2.0
    c.datagen.backoff_initial_s = 0.01
    c.datagen.backoff_max_s = 0.02
    c.datagen.max_retries_per_request = 2
    c.datagen.requests_per_minute = 0.0
  return c


@pytest.mark.parametrize("backend", ["openai", "gemini"])
def test_judges_read_text_only_unless_asked_to_see_the_image(tmp_path, monkeypatch, backend):
  monkeypatch.setenv(KEY_ENV, "sk-judge-test")
  exs = _judged_examples()[:2]
  outputs = ["a cat", "a dog"]
  with JudgeServer() as srv:
    client = judge.LLMClient(llm_test_config_for(backend, srv.url), tmp_path / "c.sqlite")
    blind = judged.judge_mmvet(exs, outputs, client)  # lmms-eval's default: text only
    text_only = list(srv.requests)
    seeing = judged.judge_mmvet(exs, outputs, client, sees_image=True)
    with_image = srv.requests[len(text_only) :]
    reviews = judged.judge_llavaw(exs, outputs, client)
  assert [r["image_sha"] for r in text_only] == [None, None]
  # The image-seeing calls are new requests (not the text-only cache entries), with the image.
  assert sorted(r["image_sha"] for r in with_image) == sorted(
    hashlib.sha256(e.image).hexdigest() for e in exs
  )
  assert [s.score for s in blind] == [1.0, 1.0] == [s.score for s in seeing]
  assert {s.extra["judge_sees_image"] for s in blind} == {False}
  assert {s.extra["judge_sees_image"] for s in seeing} == {True}
  assert judged.aggregate_mmvet(exs, blind)["judge_sees_image"] is False
  assert judged.aggregate_mmvet(exs, seeing)["judge_sees_image"] is True
  # LLaVA-W's judge reads the captions in its text; the pairs are (8, words of the answer).
  assert [s.parsed for s in reviews] == [[8.0, 2.0], [8.0, 2.0]]


def test_an_image_the_judge_cannot_send_is_missing_not_zero(tmp_path, monkeypatch):
  monkeypatch.setenv(KEY_ENV, "sk-judge-test")
  exs = _judged_examples()[:2]
  exs[1] = dataclasses.replace(exs[1], image=b"not an image")
  with JudgeServer() as srv:
    client = judge.LLMClient(llm_test_config(srv.url), None)
    scores = judged.judge_mmvet(exs, ["a cat", "a dog"], client, reasks=0, sees_image=True)
  assert scores[0].score == 1.0 and scores[1].score is None
  assert "mmvet/q1: image: corrupt or unreadable image" in scores[1].extra["judge_error"]
  assert len(srv.requests) == 1
  assert judged.aggregate_mmvet(exs, scores)["missing"] == 1


def test_judge_rejects_the_world_oracle():
  from configs import eval as eval_config

  c = eval_config.llm_config("world", model="oracle", structured_output=False)
  with pytest.raises(ValueError, match="world oracle cannot judge"):
    judge.LLMClient(c, None)


# --- the suite end to end on a random tiny VLM ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
  """A random tiny VLM with a real (trained) tokenizer, a built tiny-world-style split and
  fixture data for POPE (TSV) and MMStar (parquet)."""
  from compact_jax.data import build as build_lib
  from compact_jax.data import template as template_lib
  from compact_jax.data import tfds_io
  from compact_jax.data import tokenizer as tokenizer_lib
  from compact_jax.eval import bench_run
  from configs import eval as eval_config
  from tests.models import tiny_models as tm

  root = tmp_path_factory.mktemp("suite")
  template = template_lib.TEMPLATES["gemma"]
  texts = ["Is there a red square in the image? yes no", "How many circles are there? two three",
           "What color is the shape? red blue green", "Answer the question using a single word or phrase.",
           "Which option? A. B. C. D. Answer with the option's letter from the given choices directly"] * 20  # fmt: skip
  tok = tokenizer_lib.train_tokenizer(texts, root / "tok.model", vocab_size=160,
                                      control_symbols=template.control_symbols)  # fmt: skip
  model, _ = tm.random_vlm(seed=3, vocab_size=tok.vocab_size)
  from flax import nnx

  graphdef, params = nnx.split(model)
  loaded = bench_run.LoadedModel(graphdef, params, tok, template, tm.IMAGE_SIZE)

  # A built split like the tiny world's: two records, k and capabilities on each turn.
  wd = root / "ckpt_workdir"
  imgs = root / "images"
  imgs.mkdir()
  (imgs / "a.png").write_bytes(RED)
  (imgs / "b.png").write_bytes(BLUE)
  recs = [
    {"id": "w0", "image": "a.png", "conversations": [
      {"from": "human", "value": "<image>\nWhat color is the shape?", "capability": ["color"], "k": 1},
      {"from": "gpt", "value": "red"},
      {"from": "human", "value": "How many red squares are there?", "capability": ["color", "counting", "shape"], "k": 3},
      {"from": "gpt", "value": "one"}]},
    {"id": "w1", "image": "b.png", "conversations": [
      {"from": "human", "value": "<image>\nHow many circles are there?", "capability": ["counting", "shape"], "k": 2},
      {"from": "gpt", "value": "two"}]},
  ]  # fmt: skip
  (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
  tfds_io.build_dataset({"test": [root / "test.jsonl"]}, [imgs], build_lib.tfds_dir(wd))

  data = root / "bench_data"
  fx.pope_tsv(data, n=6)
  fx.mmstar_parquet(data, n=4)
  config = eval_config.get_config("smoke,benchmarks=pope,mmstar,tinyworld")
  with config.unlocked():
    config.bench.data_dir = str(data)
    config.bench.prompt_buckets = (32, 64, 128)
    config.bench.max_new_tokens = 6  # the batch-size test's shapes: one compile serves both
    config.data.image_size = tm.IMAGE_SIZE
  return config, loaded, wd


def test_batch_of_one_equals_batch_of_eight_through_the_suite(tiny_setup):
  from compact_jax.eval import bench_run

  config, loaded, wd = tiny_setup
  exs = bench_run.load_examples(config, ["pope", "tinyworld"], checkpoint_workdir=wd)
  examples = exs["pope"] + exs["tinyworld"]  # 9 prompts of several lengths, with images
  outs = {}
  for bs in (1, 8):
    with config.unlocked():
      config.bench.batch_size = bs
    outs[bs] = bench_run.Generator(loaded, config.bench)(examples, 6, desc=f"bs{bs}")
  assert outs[1] == outs[8]
  assert len(set(outs[1])) >= 3, "a degenerate model would make the comparison vacuous"


def test_suite_end_to_end_writes_predictions_results_table_and_plots(tiny_setup, tmp_path):
  from compact_jax.eval import bench_run
  from compact_jax.eval import metrics as metrics_lib

  config, loaded, wd = tiny_setup
  with config.unlocked():
    config.bench.batch_size = 8
  ckpt = {"path": str(wd), "step": 0, "id": f"{wd}@0"}
  res = bench_run.evaluate_model(config, loaded, tmp_path, checkpoint=ckpt, checkpoint_workdir=wd)
  assert res["harness_version"] == bench_run.HARNESS_VERSION and res["checkpoint"] == ckpt
  assert res["config"]["bench"]["benchmarks"] == ["pope", "mmstar", "tinyworld"]
  for name, n in (("pope", 6), ("mmstar", 4), ("tinyworld", 3)):
    rows = [
      json.loads(line)
      for line in (tmp_path / "predictions" / f"{name}.jsonl").read_text().splitlines()
    ]
    assert len(rows) == n and res["benchmarks"][name]["n"] == n
    assert {"prompt", "output", "parsed", "score", "answer", "k"} <= rows[0].keys()
  # Scores recomputed from the predictions file agree with results.json.
  pope_rows = [
    json.loads(line) for line in (tmp_path / "predictions" / "pope.jsonl").read_text().splitlines()
  ]
  assert res["benchmarks"]["pope"]["metrics"]["pooled"]["accuracy"] == pytest.approx(
    100 * sum(r["score"] for r in pope_rows) / 6
  )
  for r in pope_rows:
    assert r["parsed"] == yesno.parse_yes_no(r["output"])
  # The tiny world delegates to the eval stage's tables: k is exact.
  tw = res["benchmarks"]["tinyworld"]
  tw_rows = [
    json.loads(line)
    for line in (tmp_path / "predictions" / "tinyworld.jsonl").read_text().splitlines()
  ]
  assert [r["k"] for r in tw_rows] == [1, 3, 2]
  assert set(tw["by_k"]["by_k"]) == {"1", "2", "3"} and tw["by_k"]["ci_method"] == "wilson"
  for r in tw_rows:
    assert r["score"] == float(metrics_lib.exact_match(r["output"], r["answer"]))
  table = (tmp_path / "table.md").read_text()
  assert table.startswith(
    "| Model | InfoVQA | SeedBench2+ | MME | TextVQA | MM-Vet | CV-Bench | MMStar | LLaVA-W | Rel. % |"
  )
  assert "| POPE |" in table and "Accuracy by k, TinyWorld" in table
  for png in ("scores.png", "accuracy_by_k.png"):
    assert Image.open(tmp_path / png).size[0] > 100
  # Rel. % against a baseline run: the same results scaled by 2 -> 50% on the shared column.
  base = json.loads((tmp_path / "results.json").read_text())
  base["benchmarks"]["mmstar"]["headline"] = 2 * res["benchmarks"]["mmstar"]["headline"] or 1.0
  rel = bench_run.relative_percent(res, base)
  assert rel["benchmarks"] == ["mmstar"]
  assert rel["value"] == pytest.approx(
    100 * res["benchmarks"]["mmstar"]["headline"] / base["benchmarks"]["mmstar"]["headline"]
  )


def test_suite_records_how_the_judge_graded(tiny_setup, tmp_path, monkeypatch):
  from compact_jax.eval import bench_run

  monkeypatch.setenv(KEY_ENV, "sk-judge-test")
  config, loaded, wd = tiny_setup
  config = copy.deepcopy(config)  # the module's fixture stays as the other tests expect
  data = tmp_path / "data"
  fx.write_tsv(data / "mmvet" / "MMVet.tsv", [
    {"index": i, "image": fx.b64(RED), "question": f"What is shown {i}?", "answer": ans,
     "category": "rec"} for i, ans in enumerate(["cat", "dog", "sun"])])  # fmt: skip
  ckpt = {"path": str(wd), "step": 0, "id": f"{wd}@0"}
  with JudgeServer() as srv, config.unlocked():
    config.bench.benchmarks = ("mmvet",)
    config.bench.data_dir = str(data)
    config.bench.judge = llm_test_config(srv.url)
    config.bench.batch_size = 4
    res = bench_run.evaluate_model(config, loaded, tmp_path / "out", checkpoint=ckpt,
                                   checkpoint_workdir=wd)  # fmt: skip
  entry = json.loads((tmp_path / "out" / "results.json").read_text())["benchmarks"]["mmvet"]
  assert entry["judge_sees_image"] is False and entry["metrics"]["judge_sees_image"] is False
  assert entry["metrics"]["judge"]["model"] == "judge-test"
  assert entry["metrics"]["judge_prompt_version"] == judged.PROMPT_VERSIONS["mmvet"]
  assert res["config"]["bench"]["judge_sees_image"] is False
  assert all(r["image_sha"] is None for r in srv.requests) and len(srv.requests) == 3
  rows = [
    json.loads(x) for x in (tmp_path / "out/predictions/mmvet.jsonl").read_text().splitlines()
  ]
  # Each score is the judge's grade of that output (the server's rule: truth in the output).
  for r in rows:
    assert r["score"] == (1.0 if r["answer"] in r["output"].lower() else 0.0)


def test_relative_percent_reproduces_compact_table():
  from compact_jax.eval import bench_run

  cols = ("infovqa", "seedbench2plus", "mme", "textvqa", "mmvet", "cvbench", "mmstar", "llava_wild")
  llava = [20.80, 41.72, 1478.48, 46.99, 29.22, 60.92, 35.11, 68.50]
  compact = [23.68, 43.13, 1379.94, 44.37, 31.74, 55.28, 36.13, 64.50]

  def results(values):
    return {"benchmarks": {c: {"headline": v} for c, v in zip(cols, values)}}

  # COMPACT README: 100.18 (shared/reference/data_formats_benchmarks_metrics.md §5.1).
  rel = bench_run.relative_percent(results(compact), results(llava))
  assert round(rel["value"], 2) == 100.18 and len(rel["benchmarks"]) == 8
