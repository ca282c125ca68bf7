"""The serving layer: the Serve application, its HTTP ingress, the turn pipeline, streaming and the OpenAI
route, with the HTTP wire types."""
