"""The web console (/ui) and the offline API docs (/docs): static files the service hosts.

static/ holds the console, plain HTML, CSS and JavaScript modules with no
build step, which uses the public API like any other client; vendor/ holds
third-party files served as they were released (each folder's VENDORED.md
says where from). hosting.py serves both.
"""
