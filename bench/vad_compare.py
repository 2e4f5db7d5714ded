"""Silero VAD (the one /v1/realtime uses) against WebRTC VAD on espeak-ng speech in noise.

Three spoken sentences with a second of silence around each, clean, in white noise at
10 dB SNR and in pink noise at 5 dB; per 30 ms frame: recall of speech frames, false alarms
on the rest, CPU per frame, and how many turns each VAD yields through the same
500 ms hangover (3 is right). WebRTC VAD is not a dependency: to include it,
``pip install --target /tmp/wvad webrtcvad-wheels`` and set ``PYTHONPATH=/tmp/wvad``.

    python -m bench.vad_compare
"""

import subprocess
import tempfile
import time
import wave

import numpy as np

try:
    import webrtcvad
except ImportError:
    webrtcvad = None
from serve_app.realtime.audio import Resampler
from serve_app.realtime.vad import FRAME, SileroStream

rng = np.random.default_rng(0)


def load(p):
    w = wave.open(p)
    r = w.getframerate()
    pcm = w.readframes(w.getnframes())
    return np.frombuffer(Resampler(r, 16000)(pcm, last=True), "<i2").astype(np.float32) / 32768


SENTENCES = [
    ("en-us", "175", "What is the capital of France?"),
    ("en-us", "150", "Please tell me a short story about a dragon and a knight."),
    ("en-gb", "190", "Turn the lights off in the kitchen, and set an alarm for seven."),
]


def spoken() -> list:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (voice, speed, text) in enumerate(SENTENCES):
            path = f"{tmp}/s{n}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", speed, "-w", path, text], check=True)
            out.append(load(path))
    return out


speech = spoken()


def scene():
    parts, truth = [], []
    for s in speech:
        gap = np.zeros(16000)
        parts += [gap, s]
        truth += [np.zeros(gap.size, bool), np.abs(s) > 0]
    parts.append(np.zeros(16000))
    truth.append(np.zeros(16000, bool))
    x = np.concatenate(parts)
    t = np.concatenate(truth)
    # frame truth: a 32 ms frame is speech when its clean RMS is within 35 dB of the loudest
    return x, t


def pink(n):
    w = rng.standard_normal(n)
    f = np.fft.rfft(w)
    f /= np.sqrt(np.arange(1, f.size + 1))
    return np.fft.irfft(f, n)


def noisy(x, kind, snr_db):
    if kind == "clean":
        return x
    n = rng.standard_normal(x.size) if kind == "white" else pink(x.size)
    sp = np.mean(x[np.abs(x) > 0.01] ** 2)
    n *= np.sqrt(sp / 10 ** (snr_db / 10) / np.mean(n**2))
    return np.clip(x + n, -1, 1).astype(np.float32)


clean, _ = scene()
F = 480  # 30 ms for both (Silero gets 512)
rms = np.array([np.sqrt(np.mean(clean[i : i + F] ** 2)) for i in range(0, clean.size - F, F)])
truth = rms > rms.max() * 10 ** (-35 / 20)


def silero_frames(x):
    m = SileroStream()
    probs = []
    t0 = time.perf_counter()
    for i in range(0, x.size - FRAME, FRAME):
        probs.append(m(x[i : i + FRAME]))
    dt = (time.perf_counter() - t0) / len(probs)
    # map 32 ms decisions onto the 30 ms truth grid
    centers = (np.arange(truth.size) * F + F // 2) // FRAME
    p = np.array(probs)
    return p[np.minimum(centers, p.size - 1)], dt


def webrtc_frames(x, mode):
    v = webrtcvad.Vad(mode)
    pcm = (x * 32767).astype("<i2").tobytes()
    out = []
    t0 = time.perf_counter()
    for i in range(truth.size):
        out.append(v.is_speech(pcm[i * F * 2 : (i + 1) * F * 2], 16000))
    return np.array(out, float), (time.perf_counter() - t0) / len(out)


def turns(probs, thr, frame_ms=30, silence_ms=500):
    speaking, sil, n = False, 0, 0
    for p in probs:
        if p >= thr:
            sil = 0
            if not speaking:
                speaking, n = True, n + 1
        elif speaking:
            sil += frame_ms
            if sil >= silence_ms:
                speaking = False
    return n


print("| noise | VAD | speech recall | false alarms on non-speech | turns (3 spoken) | µs/frame |")
print("|---|---|---|---|---|---|")
for kind, snr in [("clean", None), ("white", 10), ("pink", 5)]:
    x = noisy(clean, kind, snr)
    for name, fn, thr in [
        ("silero (0.5)", lambda x=x: silero_frames(x), 0.5),
        ("webrtc mode 2", lambda x=x: webrtc_frames(x, 2), 0.5),
        ("webrtc mode 3", lambda x=x: webrtc_frames(x, 3), 0.5),
    ][: 3 if webrtcvad else 1]:
        p, dt = fn()
        d = p >= thr
        rec = (d & truth).sum() / truth.sum()
        fa = (d & ~truth).sum() / (~truth).sum()
        noise = kind if snr is None else f"{kind} {snr} dB"
        print(f"| {noise} | {name} | {rec:.2f} | {fa:.2f} | {turns(p, thr)} | {dt * 1e6:.0f} |")
