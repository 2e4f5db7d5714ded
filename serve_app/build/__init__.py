"""The builder: config -> a Serve application. The only place Ray decorators touch Troupe's
plain classes (``serve.deployment`` on the gateway and the model replicas, ``ray.remote`` on
the actors), so everything else is testable without Ray.
"""
