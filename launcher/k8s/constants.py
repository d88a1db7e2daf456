"""The Kubernetes facts that the planner, the renderer, the validator and the k8s target share."""

# One constant for the Ray version: images and rayVersion follow it; it must match pyproject's pin
# (a test checks it against the installed ray).
RAY_VERSION = "2.60.0"
PYTHON_TAG = "py311"
API_VERSION = "ray.io/v1"
GROUP, VERSION, RAYJOBS = "ray.io", "v1", "rayjobs"
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
# The operator appends 6 characters to a RayJob's name for its RayCluster (limit 53): 47 is left.
MAX_RAYJOB_NAME = 47
MAX_RAYCLUSTER_NAME = 53
# Where rendered pods mount the shared volume: relative spec paths on k8s resolve against it.
STORAGE_MOUNT = "/mnt/cluster_storage"
DEFAULT_PVC = "ftlaunch-storage"
# Every object ftlaunch creates carries this label; `ftlaunch list --target k8s` selects on it.
APP_LABEL, APP_NAME = "app.kubernetes.io/name", "ftlaunch"
RUN_DIR_ANNOTATION = "ftlaunch/run-dir"
