"""Federation: identity, manifests, catalogues, members, publication and the federation node."""
