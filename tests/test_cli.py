"""The command line on a checkpoint folder: text, a wav file, the latency table, and clear errors."""
import pytest
import torch

from omni_runtime import cli
from omni_runtime.cli import main
from omni_runtime.engine.lease import RunnerBusyError

soundfile = pytest.importorskip("soundfile")   # a runtime dependency; absent on some GPU images


def test_generate_writes_speech_and_prints_latencies(reference_checkpoint, tmp_path, capsys):
    folder, _ = reference_checkpoint()
    out = tmp_path / "reply.wav"
    prompt = "151644,872,198,1000,1001,151645,198,151644,77091,198"
    assert main(["generate", "--model", str(folder), "--ids", prompt, "--max-new-tokens", "4",
                 "--talker-max-new-tokens", "6", "--out", str(out), "--stream"]) == 0
    printed = capsys.readouterr().out
    for row in ("time to first token", "first audio packet", "thinker tokens/s", "talker frames/s", "real-time factor"):
        assert row in printed
    audio, rate = soundfile.read(out)
    assert rate == 24000 and audio.shape == (1920 * 5 - 555,)


def test_errors_are_reported_not_raised(reference_checkpoint, tmp_path, capsys):
    folder, _ = reference_checkpoint()
    assert main(["generate", "--model", str(folder), "--ids", "1,2,3", "--speaker", "nobody",
                 "--out", str(tmp_path / "x.wav")]) == 2
    assert "unknown speaker" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_concurrent_answers(reference_checkpoint, tmp_path, capsys):
    # --concurrency 3: three answers spoken at once, each written to its own file; answer i is seeded with seed + i,
    # so answer 0 is the single answer with the same --seed
    folder, _ = reference_checkpoint()
    prompt = "151644,872,198,1000,1001,151645,198,151644,77091,198"
    args = ["generate", "--model", str(folder), "--ids", prompt, "--max-new-tokens", "4", "--talker-max-new-tokens",
            "6", "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "one.wav")]) == 0
    assert main(args + ["--out", str(tmp_path / "many.wav"), "--concurrency", "3"]) == 0
    printed = capsys.readouterr().out
    assert "concurrency 3:" in printed and "first audio packet median" in printed and "real-time factor" in printed
    single, _ = soundfile.read(tmp_path / "one.wav")
    answers = [soundfile.read(tmp_path / f"many-{index}.wav") for index in range(3)]
    assert all(rate == 24000 and audio.size for audio, rate in answers)
    assert answers[0][0].shape == single.shape and abs(answers[0][0] - single).max() < 1e-4


@pytest.mark.parametrize("options, message", [
    (["--ids", ""], "argument --ids: expected comma-separated integer token ids, got ''"),
    (["--ids", "1,a"], "argument --ids: expected comma-separated integer token ids, got '1,a'"),
    (["--ids", "1,2", "--audio", "a.wav"], "--audio and --image need --text"),
    (["--out", "missing/x.wav"], "argument --out: missing/x.wav: the folder missing does not exist"),
    (["--out", "x.foo"], "argument --out: x.foo: not an audio file extension"),
    (["--concurrency", "0"], "--concurrency must be >= 1, got 0"),
    (["--concurrency", "2", "--stream"], "--stream prints one answer as it streams"),
])
def test_bad_options_are_refused_before_any_work(options, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--model", "never-loaded", *options])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_out_extension_is_case_insensitive_and_unwritable_out_is_one_line(reference_checkpoint, tmp_path, capsys):
    folder, _ = reference_checkpoint()
    prompt = "151644,872,198,1000,151645,198,151644,77091,198"
    args = ["generate", "--model", str(folder), "--ids", prompt, "--max-new-tokens", "2", "--talker-max-new-tokens",
            "3", "--out"]
    assert main(args + [str(tmp_path / "reply.FLAC")]) == 0 and soundfile.read(tmp_path / "reply.FLAC")[1] == 24000
    (tmp_path / "taken.wav").mkdir()   # a folder where the file should go: the write fails
    assert main(args + [str(tmp_path / "taken.wav")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omni-runtime: error: --out: cannot write") and err.count("\n") == 1


def test_bad_device_is_named(monkeypatch, capsys):
    assert main(["generate", "--device", "tpu"]) == 2
    assert "omni-runtime: error: device='tpu' is not a torch device" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--device", "cuda"]) == 2
    assert f"device='cuda' but CUDA is not available (torch {torch.__version__}" in capsys.readouterr().err


def test_text_without_tokenizer_needs_ids_unless_built_in(reference_checkpoint, capsys):
    folder, _ = reference_checkpoint()   # no tokenizer.json
    assert main(["generate", "--model", str(folder), "--text", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--text needs the checkpoint's tokenizer.json" in err and "--ids" in err
    assert main(["generate", "--text", "hi", "--max-new-tokens", "2"]) == 0   # the built-in model: UTF-8 bytes


def test_busy_runners_are_reported(monkeypatch, capsys):
    def busy(args):
        raise RunnerBusyError("the runners are in use by generate()")
    monkeypatch.setattr(cli, "generate", busy)
    assert main(["generate"]) == 2
    assert capsys.readouterr().err == "omni-runtime: error: the runners are in use by generate()\n"


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--max-new-tokens MAX_NEW_TOKENS most text tokens to generate (default: 32)",
                  "--talker-max-new-tokens TALKER_MAX_NEW_TOKENS most speech frames", "(default: 512)",
                  "--speaker SPEAKER the voice: one of the checkpoint's speakers (default: ethan)",
                  "--device DEVICE torch device", "(default: cpu)", "--dtype {float32,bfloat16,float16} weight",
                  "--top-k TOP_K thinker top-k", "--top-p TOP_P thinker top-p", "<|im_start|>assistant\\n"):
        assert shown in text
    assert "(default: None)" not in text and "``" not in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_text_only_checkpoint_answers_concurrently_and_refuses_out(tmp_path, capsys):
    # no talker: --concurrency decodes the answers together as text (seeds seed + i, so answer 0 is the single
    # answer); --out is refused as on one answer
    from omni_runtime.demo import DEMO_CONFIG, write_random_checkpoint
    text_only = {k: v for k, v in DEMO_CONFIG.items() if k not in ("talker_config", "code2wav_config")}
    folder = write_random_checkpoint(tmp_path / "text-only", text_only)
    args = ["generate", "--model", str(folder), "--ids", "151644,872,198,1000,151645", "--max-new-tokens", "3",
            "--temperature", "0.8", "--seed", "5"]
    assert main(args) == 0
    single = [line for line in capsys.readouterr().out.splitlines() if line.startswith("answer: ")]
    assert main(args + ["--concurrency", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"answer 0: {single[0].removeprefix('answer: ')}\n" in printed and "answer 1: " in printed
    assert "concurrency 2:" in printed and "6 tokens" in printed
    assert main(args + ["--concurrency", "2", "--out", str(tmp_path / "x.wav")]) == 2
    assert "return_audio=True needs a checkpoint with a talker" in capsys.readouterr().err
