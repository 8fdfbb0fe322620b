"""TextVQA (val, 5,000 questions): VQA accuracy over 10 human answers.

Answers are normalised with the official VQA/EvalAI processing (a faithful port
of ``EvalAIAnswerProcessor`` in lmms-eval ``_task_utils/vqa_eval_metric.py`` and
LLaVA's ``m4c_evaluator.py``, quirks included: ``PERIOD_STRIP.sub`` receives
``re.UNICODE`` as its *count*, shared/reference/data_formats_benchmarks_metrics.md
§3.1). Accuracy is the mean over the 10 leave-one-out subsets of
min(1, #matches / 3).

Prompt: lmms-eval's ``question.capitalize()`` + the short-answer instruction,
WITHOUT OCR tokens by default (COMPACT's baseline 46.99 matches no-OCR; LLaVA's own
script adds "Reference OCR token: ..." and gets 58.2). ``config.bench.textvqa_ocr``
adds them; every result records which protocol it used.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Sequence
from typing import Any

from compact_jax.eval.benchmarks import core
from compact_jax.eval.benchmarks import formats as fmt

# fmt: off
CONTRACTIONS = {
  "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
  "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
  "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
  "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
  "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
  "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
  "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
  "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
  "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
  "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
  "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
  "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
  "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
  "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
  "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
  "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
  "somethingd've": "something'd've", "something'dve": "something'd've",
  "somethingll": "something'll", "thats": "that's", "thered": "there'd",
  "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
  "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
  "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
  "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
  "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
  "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
  "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
  "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
  "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
  "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
  "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
  "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
  "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_MAP = {
  "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!"]
# fmt: on
ARTICLES = ("a", "an", "the")
# `(?!<=\d)` is a typo for a lookbehind in the official code (it is a lookahead for
# the text "<=" + digit); kept, like everything here, for bit-exact scores.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _process_punctuation(text: str) -> str:
  out = text
  for p in PUNCTUATIONS:
    if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  # The official code passes re.UNICODE (= 32) as `count`: at most 32 periods go.
  return PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _process_digit_article(text: str) -> str:
  words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa(answer: str) -> str:
  """The EvalAI/VQA answer normalisation ("Two dogs." -> "2 dogs")."""
  text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """Mean over leave-one-out subsets of the human answers of min(1, matches / 3)."""
  pred = normalize_vqa(prediction)
  gts = [normalize_vqa(a) for a in answers]
  accs = []
  for i in range(len(gts)):
    matches = sum(g == pred for j, g in enumerate(gts) if j != i)
    accs.append(min(1.0, matches / 3))
  return sum(accs) / len(accs)


def _read_original(files: list[pathlib.Path], bench_dir: pathlib.Path) -> list[fmt.Row]:
  rows = []
  for n, r in enumerate(fmt.read_json(files[0])["data"]):
    where = f"{files[0]} data[{n}]"
    image = fmt.read_image_file(bench_dir / "train_images", f"{r['image_id']}.jpg", where=where)
    rows.append({**r, "image": image, "_where": where})
  return rows


LAYOUTS = (
  fmt.Layout("TextVQA_VAL.tsv", "VLMEvalKit's TextVQA_VAL.tsv",
             "https://opencompass.openxlab.space/utils/VLMEval/TextVQA_VAL.tsv", fmt.read_tsv),
  fmt.Layout("**/validation-*.parquet", "the validation parquet shards of lmms-lab/textvqa",
             "https://huggingface.co/datasets/lmms-lab-encoder/textvqa (was lmms-lab/textvqa)", fmt.read_parquet),
  fmt.Layout("TextVQA_0.5.1_val.json", "TextVQA_0.5.1_val.json plus the train_images/ folder",
             "https://textvqa.org/dataset (train_val_images.zip)", _read_original),
)  # fmt: skip


def load(bench_dir: pathlib.Path, options: core.Options) -> list[core.Example]:
  _, rows = fmt.load_rows("textvqa", bench_dir, LAYOUTS)
  out = []
  for n, r in enumerate(rows):
    where = r.get("_where", f"row {n}")
    q = str(fmt.field(r, "question")).strip()
    answers = fmt.literal_list(fmt.field(r, "answers", "answer"), where=where)
    ocr = ""
    if options.textvqa_ocr:
      tokens = fmt.field(r, "ocr_tokens", default=None)
      if tokens is None:
        raise ValueError(f"{where}: config.bench.textvqa_ocr is set but this format has no "
                         "ocr_tokens (use lmms-lab/textvqa's parquet)")  # fmt: skip
      ocr = "\nReference OCR token: " + ", ".join(fmt.literal_list(tokens, where=where))
    out.append(core.Example(
      id=str(fmt.field(r, "question_id", "index", default=n)),
      question=q, prompt=q.capitalize() + ocr + core.SHORT_ANSWER, image=r["image"],
      answer=answers, meta={"ocr_in_prompt": options.textvqa_ocr},
    ))  # fmt: skip
  return out


def score(example: core.Example, output: str) -> core.Scored:
  return core.Scored(normalize_vqa(output), vqa_accuracy(output, example.answer))


def aggregate(examples: Sequence[core.Example], scores: Sequence[core.Scored]) -> dict[str, Any]:
  acc = 100.0 * core.mean(core.scored_values(scores))
  ocr = sorted({bool(e.meta["ocr_in_prompt"]) for e in examples})
  return {"headline": acc, "accuracy": acc, "ocr_tokens_in_prompt": ocr == [True],
          "n": len(examples)}  # fmt: skip


BENCHMARK = core.Benchmark("textvqa", "TextVQA", load, score, aggregate, max_new_tokens=16)
