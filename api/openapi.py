"""`python -m api.openapi`: print the OpenAPI document (what `make openapi` writes to openapi.json)."""

import json
import sys

from api.main import create_app
from shared.settings import Settings


def render() -> str:
    # Built without starting the lifespan: no database or broker is needed to describe the API.
    app = create_app(Settings())
    return json.dumps(app.openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
