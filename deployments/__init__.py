"""Model replicas: one plain class per modality over one engine (``lifecycle.EngineHost``:
start, load/unload, stats), and the engines behind them (``engines/``, built from config by
``engines.registry``)."""
