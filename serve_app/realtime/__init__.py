"""OpenAI's Realtime protocol over Troupe's speech-to-text, text and text-to-speech models.

``session`` (client events -> server events), ``responding`` and ``response`` (answers),
``input`` and ``vad`` (the input audio buffer and server turn detection), ``audio``
(wire formats and resampling), ``conversation`` (items), ``models`` (the model calls
and metering). The WebSocket route is ``serve_app/routes/realtime.py``.
"""
