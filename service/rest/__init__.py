"""The REST layer: HTTP in, `DataPlane` calls, HTTP out.

`app` builds the FastAPI app and runs its lifespan; `routes` delegate to the
data plane; `requests` and `responses` are their plumbing; `errors` is the one
place an error becomes a response; `openapi` documents it all.
"""
