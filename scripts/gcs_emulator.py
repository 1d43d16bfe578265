"""A local Cloud Storage emulator (gcp-storage-emulator) that Orbax checkpoints work against.

  python scripts/gcs_emulator.py --port 9023 --bucket my-bucket
  export STORAGE_EMULATOR_HOST=http://127.0.0.1:9023      # gcsfs: metrics, samples, eval, ...
  export TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:9023   # TensorStore: Orbax checkpoints
  python launch.py --config=configs/tiny.py --workdir=gs://my-bucket/run

gcp-storage-emulator (requirements-test.txt) stores objects in memory here. Its object downloads
lack the `x-goog-generation` / `x-goog-metageneration` headers that Cloud Storage sends; TensorStore
takes an object's generation from them, and Orbax's OCDBT checkpoints revalidate their manifest
with it, so against the emulator as released a checkpoint of more than a few dozen arrays fails
with "Malformed StorageGeneration". This script adds the two headers (from the object's own
metadata, as Cloud Storage does) and otherwise runs the emulator unchanged. Prints
"ready <port>" once it accepts requests; runs until interrupted or killed.
"""
import argparse
import sys
import time

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj["metageneration"])


def patch_downloads() -> None:
  """Routes every object download through `_download_with_generation`: the download routes
  and `objects.get` (?alt=media), which calls the module's `download`."""
  routes = [h for _, h in server.HANDLERS if h.get(server.GET) is _download]
  if not routes:
    raise RuntimeError("gcp_storage_emulator has no download route to patch (version change?)")
  for handlers in routes:
    handlers[server.GET] = _download_with_generation
  objects.download = _download_with_generation


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--bucket", default=None, help="bucket to create")
  args = parser.parse_args(argv)
  patch_downloads()
  emulator = server.create_server(args.host, args.port, in_memory=True,
                                  default_bucket=args.bucket)
  emulator.start()
  print(f"ready {args.port}", flush=True)
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    pass
  finally:
    emulator.stop()


if __name__ == "__main__":
  sys.exit(main())
