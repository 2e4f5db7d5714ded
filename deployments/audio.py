"""Audio in and out, through libraries: PyAV (FFmpeg) decodes uploads and encodes
mp3/opus/flac/aac; WAV and raw PCM are written directly (a header and int16 samples).

:class:`StreamingEncoder` turns float32 sample blocks into encoded bytes as they come, so
speech can be sent sentence by sentence. :func:`decode_audio` reads any container FFmpeg
knows (WAV, FLAC, MP3, OGG, WebM, ...) into 16 kHz mono float32.
"""

from __future__ import annotations

import io
import struct
from typing import Optional

import numpy as np

__all__ = ["StreamingEncoder", "encode_audio", "decode_audio", "AudioDecodeError", "to_int16"]

# Our format name -> (FFmpeg container, codec, sample rate the codec needs or None).
_AV_FORMATS = {
    "mp3": ("mp3", "libmp3lame", None),
    "opus": ("ogg", "libopus", 48000),
    "flac": ("flac", "flac", None),
    "aac": ("adts", "aac", None),
}


class AudioDecodeError(ValueError):
    """The bytes are not audio any decoder here understands."""


def to_int16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")


def _wav_header(sample_rate: int, data_bytes: int) -> bytes:
    """A 16-bit mono PCM WAV header; ``data_bytes`` 0xFFFFFFFF means 'streamed, size unknown'."""
    riff = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
    return (
        b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data" + struct.pack("<I", data_bytes)
    )


class _Sink:
    """A write-only file for PyAV's muxer; we drain what it wrote after each packet."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class StreamingEncoder:
    """Encode float32 mono blocks to ``fmt`` incrementally (wav, pcm, mp3, opus, flac, aac)."""

    def __init__(self, fmt: str, sample_rate: int) -> None:
        self.fmt = fmt
        self.sample_rate = sample_rate
        self._header_sent = False
        self._container = None
        if fmt in _AV_FORMATS:
            import av

            container_fmt, codec, rate = _AV_FORMATS[fmt]
            self._sink = _Sink()
            self._container = av.open(self._sink, mode="w", format=container_fmt)
            self._out_rate = rate or sample_rate
            stream = self._container.add_stream(codec, rate=self._out_rate)
            assert isinstance(stream, av.audio.stream.AudioStream)  # every codec in _AV_FORMATS is audio
            self._stream = stream
            self._stream.layout = "mono"
            self._resampler = av.AudioResampler(
                format=self._stream.codec_context.format or "s16",
                layout="mono",
                rate=self._out_rate,
            )
        elif fmt not in ("wav", "pcm"):
            raise ValueError(f"unsupported audio format {fmt!r}")

    def add(self, samples: np.ndarray) -> bytes:
        """Encoded bytes for this block (may be empty while the codec buffers)."""
        if self._container is None:
            data = to_int16(samples).tobytes()
            if self.fmt == "wav" and not self._header_sent:
                self._header_sent = True
                return _wav_header(self.sample_rate, 0xFFFFFFFF) + data
            return data
        import av

        frame = av.AudioFrame.from_ndarray(
            to_int16(samples).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = self.sample_rate
        for rf in self._resampler.resample(frame):
            for packet in self._stream.encode(rf):
                self._container.mux(packet)
        return self._sink.drain()

    def finish(self) -> bytes:
        if self._container is None:
            if self.fmt == "wav" and not self._header_sent:
                self._header_sent = True
                return _wav_header(self.sample_rate, 0)
            return b""
        for rf in self._resampler.resample(None):
            for packet in self._stream.encode(rf):
                self._container.mux(packet)
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.drain()


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A whole file. WAV gets exact sizes in its header (not the streaming form)."""
    if fmt == "wav":
        data = to_int16(samples).tobytes()
        return _wav_header(sample_rate, len(data)) + data
    enc = StreamingEncoder(fmt, sample_rate)
    return enc.add(samples) + enc.finish()


def decode_audio(data: bytes, sample_rate: int = 16000, max_seconds: Optional[float] = None) -> np.ndarray:
    """Decode any FFmpeg-readable audio to mono float32 at ``sample_rate``.

    Raises:
        AudioDecodeError: not audio (or no audio stream), or longer than ``max_seconds``.
    """
    import av

    if not data:
        raise AudioDecodeError("the file is empty")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as exc:  # av raises many FFmpeg error kinds
        raise AudioDecodeError(f"not a readable audio file ({type(exc).__name__})") from None
    try:
        if not container.streams.audio:
            raise AudioDecodeError("the file has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        parts: list[np.ndarray] = []
        total = 0
        limit = None if max_seconds is None else int(max_seconds * sample_rate)
        try:
            for frame in container.decode(audio=0):
                for rf in resampler.resample(frame):
                    arr = rf.to_ndarray().reshape(-1)
                    parts.append(arr)
                    total += arr.size
                if limit is not None and total > limit:
                    raise AudioDecodeError(
                        f"the audio is longer than {max_seconds:.0f} s, the most accepted"
                    )
            for rf in resampler.resample(None):
                parts.append(rf.to_ndarray().reshape(-1))
        except AudioDecodeError:
            raise
        except Exception as exc:
            raise AudioDecodeError(f"the audio could not be decoded ({type(exc).__name__})") from None
    finally:
        container.close()
    if not parts:
        raise AudioDecodeError("the file holds no audio samples")
    return np.concatenate(parts).astype(np.float32, copy=False)
