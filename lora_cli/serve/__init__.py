"""`lora serve`: an OpenAI-compatible server for local use and demos (app.py), over the models in registry.py."""


def serve(targets: list[str], host: str = "127.0.0.1", port: int = 8000, load_in_4bit: bool = False,
          api_key: str | None = None, progress=print) -> None:
    import uvicorn

    from lora_cli.serve.app import create_app
    from lora_cli.serve.registry import Registry

    registry = Registry()
    registry.load(targets, load_in_4bit, progress)
    app = create_app(registry, api_key)
    progress(f"Serving {', '.join(registry.models)} on http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)")
    progress(f"  curl http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' "
             + (f"-H 'Authorization: Bearer {api_key}' " if api_key else "")
             + f"-d '{{\"model\": \"{next(iter(registry.models))}\", \"messages\": [{{\"role\": \"user\", "
             "\"content\": \"Hello\"}]}'")
    uvicorn.run(app, host=host, port=port, log_level="warning")
