"""JSON schemas and tools shared by the structured-output tests. Every string has a maxLength: a random
model's strings only end where the grammar ends them."""

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "now", "description": "The current time"}},
]
# What each tool's arguments must validate against ("now" takes none).
SCHEMAS = {"get_weather": WEATHER, "now": {"type": "object", "maxProperties": 0}}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
