"""For a quick test with python pretended frontend: call server.py with and without a token.

    python examples/client.py --url http://127.0.0.1:8080

It mints its token with the same settings as server.py (a token from any other
secret, refresh_interval or exptime would be refused) and prints one row per
request: path, status code and the response text (as a Python string literal).
"""

import argparse
import asyncio

from aiohttp import ClientSession

from jwtplus import SecretManager

# The same settings as server.py: every process that must accept the others' tokens
# needs the same secret, refresh_interval and exptime (and algorithm).
secret_manager = SecretManager(
    secret="testsecret",  # default empty, will generate a random string.
    refresh_interval="30d",  # as server.py: the token names its rotation period in its "kid".
    scheme="Bearer",  # default.
    algorithm="HS256",  # default.
    exptime="30d",  # default.
    allow_weak_secret=True,  # 'testsecret' is the seed's demo secret, shorter than HS256's 32 bytes
)

url_exts = [
    "/index.html",
    "/login.html",
    "/authentication",
    "/setattr",
    "/404",
]


async def call_all(session: ClientSession, base_url: str, headers: dict[str, str]) -> None:
    for urlext in url_exts:
        async with session.get(base_url + urlext, headers=headers) as response:
            text = await response.text()
            print(f"called {urlext:<16} get statuscode {response.status}  return text {text!r}")


async def main(base_url: str) -> None:
    # Simulate you've already got token feedback from server.
    # If you would like to generate token (without scheme), it accepts a dictionary
    # and items in which would be updated to jwt source payload.
    token = secret_manager.encode({"username": "jacky"})
    headers = {"Authorization": "Bearer " + token}
    async with ClientSession() as session:
        print(f"{'#' * 22}\nWith authentication")
        await call_all(session, base_url, headers)
        print(f"{'#' * 22}\nWithout authentication")
        await call_all(session, base_url, {"Authorization": "None"})


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", default="http://127.0.0.1:8080", help="server.py's address (default: %(default)s)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.url.rstrip("/")))


if __name__ == "__main__":
    cli()
