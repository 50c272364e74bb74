"""The command line on a checkpoint folder: text, a wav file, the latency table, and clear errors."""
import soundfile

from omni_runtime.cli import main


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
    assert main(args + ["--concurrency", "0"]) == 2
    assert "--concurrency must be >= 1" in capsys.readouterr().err
