"""edgesdk's on-device agent (issue 3). Device-side: never imports TensorFlow."""
