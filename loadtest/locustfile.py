"""locust against the pdserve router over gRPC: each user sends one streamed Generate after
another and reports three entries per request, "Generate TTFT", "Generate TPOT" and
"Generate e2e" (milliseconds; definitions in loadtest/request.py). A failed request is one
"Generate e2e" failure whose error starts with the gRPC status name.

    locust -f loadtest/locustfile.py --headless -u 4 -r 4 -t 30s --host 127.0.0.1:50051 \\
        --workload long-short --workload-params long_len=512,long_fraction=0.5 --csv out/locust

Options (each also read from the environment variable in brackets):
    --workload NAME           fixed | sharegpt-like | tenants | long-short   [PDSERVE_WORKLOAD]
    --workload-params K=V,... parameters of the workload (loadtest/workloads.py)
                                                                  [PDSERVE_WORKLOAD_PARAMS]
    --sampling-params K=V,... sampling overrides, e.g. temperature=0.8,seed=1 (default
                              greedy, ignore_eos)                 [PDSERVE_SAMPLING_PARAMS]
    --request-timeout S       gRPC deadline per request           [PDSERVE_REQUEST_TIMEOUT]
    --workload-seed N         user i draws from seed "locust:N:i" [PDSERVE_WORKLOAD_SEED]
    --report-kinds            names carry the request kind too ("Generate TTFT [long]")
                                                                  [PDSERVE_REPORT_KINDS]

The sync stubs run under gevent (locust's concurrency); grpc.aio would hang here.
"""

# locust is imported first: it monkey-patches the standard library, and gRPC must be told
# about gevent after that and before any channel exists.
from locust import User, constant, events, task  # isort: skip
from grpc.experimental import gevent as grpc_gevent  # isort: skip

grpc_gevent.init_gevent()

import itertools  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import grpc  # noqa: E402

from loadtest.request import RequestRecord, StreamTimer, parse_sampling, to_request  # noqa: E402
from loadtest.workloads import WORKLOADS, make_workload, parse_params, specs  # noqa: E402
from pdserve.v1 import router_pb2_grpc  # noqa: E402
from services.engine.errors import PdserveError  # noqa: E402
from services.rpc.server import CHANNEL_OPTIONS  # noqa: E402

_user_ids = itertools.count()
FAILURE_PAUSE_S = 0.1


class RpcFailure(Exception):
    """A Generate call that ended with a non-OK status; str() starts with the status name."""


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--workload", choices=list(WORKLOADS), default="fixed", env_var="PDSERVE_WORKLOAD",
                        help="workload generator (loadtest/workloads.py)")
    parser.add_argument("--workload-params", default="", env_var="PDSERVE_WORKLOAD_PARAMS",
                        help="workload parameters KEY=VALUE,...")
    parser.add_argument("--sampling-params", default="", env_var="PDSERVE_SAMPLING_PARAMS",
                        help="sampling overrides KEY=VALUE,... (default greedy, ignore_eos)")
    parser.add_argument("--request-timeout", type=float, default=600.0, env_var="PDSERVE_REQUEST_TIMEOUT",
                        help="gRPC deadline per request, seconds")
    parser.add_argument("--workload-seed", type=int, default=0, env_var="PDSERVE_WORKLOAD_SEED",
                        help="seed of the request streams")
    parser.add_argument("--report-kinds", action="store_true", env_var="PDSERVE_REPORT_KINDS",
                        help="add the request kind to the reported names")


@events.init.add_listener
def _check_options(environment, **_) -> None:
    """Bad parameters stop the run here, once, with the reason, instead of failing every user."""
    opts = environment.parsed_options
    if opts is None:
        return
    try:
        if not opts.host:
            raise ValueError("--host HOST:PORT (the router's gRPC address) is required")
        make_workload(opts.workload, parse_params(opts.workload_params))
        parse_sampling(opts.sampling_params)
    except (ValueError, PdserveError) as e:
        logging.getLogger("pdserve.locust").error("bad load-test options: %s", e)
        sys.exit(2)


@events.quitting.add_listener
def _final_csv_tick(environment, **_) -> None:
    # locust rewrites its CSVs once a second and not again at exit; one more tick after the
    # users stopped makes the stats CSV hold the final counts.
    if environment.parsed_options is not None and environment.parsed_options.csv_prefix:
        time.sleep(1.2)


class RouterUser(User):
    """One closed-loop client of the router at --host HOST:PORT."""

    wait_time = constant(0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.workload = make_workload(opts.workload, parse_params(opts.workload_params))
        self.sampling = parse_sampling(opts.sampling_params)
        self.timeout = opts.request_timeout
        self.report_kinds = opts.report_kinds
        self.requests = specs(self.workload, f"locust:{opts.workload_seed}:{next(_user_ids)}")
        self.channel = grpc.insecure_channel(self.host.removeprefix("grpc://"), options=CHANNEL_OPTIONS)
        self.stub = router_pb2_grpc.RouterStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def generate(self) -> None:
        spec = next(self.requests)
        started = time.time()
        timer = StreamTimer(spec)
        call = self.stub.Generate(to_request(spec, self.sampling), timeout=self.timeout)
        try:
            for response in call:
                timer.on_response(response)
        except grpc.RpcError as e:
            record = timer.fail(e.code().name)
            self._report(record, started, RpcFailure(f"{e.code().name}: {e.details()}"))
            # A refused connection fails in microseconds; without a pause the user would spin
            # and starve locust's own greenlets (stats, CSV writer) of the loop.
            time.sleep(FAILURE_PAUSE_S)
            return
        except BaseException:
            call.cancel()  # the user is being stopped mid-stream: do not leave the request running
            raise
        self._report(timer.finish(), started, None)

    def _report(self, record: RequestRecord, started: float, failure: Exception | None) -> None:
        suffix = f" [{record.kind}]" if self.report_kinds else ""
        fire = self.environment.events.request.fire
        common = {"request_type": "gRPC", "context": {}, "start_time": started}
        if failure is not None:
            elapsed_ms = (time.time() - started) * 1e3
            fire(name=f"Generate e2e{suffix}", response_time=elapsed_ms, response_length=0, exception=failure,
                 **common)
            return
        fire(name=f"Generate TTFT{suffix}", response_time=record.ttft_s * 1e3, response_length=record.prompt_tokens,
             exception=None, **common)
        if record.tpot_s is not None:
            fire(name=f"Generate TPOT{suffix}", response_time=record.tpot_s * 1e3,
                 response_length=record.output_tokens, exception=None, **common)
        fire(name=f"Generate e2e{suffix}", response_time=record.e2e_s * 1e3, response_length=record.output_tokens,
             exception=None, **common)
