"""A real federation: SuperLink and SuperNodes as processes over HTTPS with TLS and node
authentication (certificates, supervisor, ``fed-ser-deploy``)."""
