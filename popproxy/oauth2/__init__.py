"""OAuth2 for upstream logins: access tokens kept fresh, and the flows of ``oauth-login``.

- ``grants.py``: token endpoint answers parsed and classified (pure).
- ``http.py``: the form POST to an endpoint (standard library, blocking).
- ``token_file.py``: the refresh-token file, rewritten atomically when it rotates.
- ``cache.py``: access tokens per upstream account, refreshed single-flight.
- ``flows.py``: the authorization-code flow with PKCE and the device flow.
"""
