"""Read a JSON file that must hold one object, with errors that name the file (config.json,
tokenizer_config.json, generation_config.json, checkpoint state)."""
import json


def read_json_object(file) -> dict:
    with open(file, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data
