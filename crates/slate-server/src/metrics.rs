//! Prometheus metrics: queue depth, jobs by state, provisioning and job durations, webhooks.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub jobs: Family<StateLabel, Gauge>,
    pub queue_depth: Family<PoolLabel, Gauge>,
    pub warm_vms: Family<PoolLabel, Gauge>,
    pub provision_seconds: Family<PoolLabel, Histogram>,
    pub job_seconds: Family<PoolLabel, Histogram>,
    pub webhooks: Family<ResultLabel, Counter>,
    pub status_reports: Family<ResultLabel, Gauge>,
    pub leaked_workers_cleaned: Counter,
    pub image_rebuilds: Family<ImageResultLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageResultLabel {
    pub image: String,
    pub result: String,
}

fn provision_buckets() -> Histogram {
    Histogram::new([
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ])
}

fn job_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.1, 2.0, 18,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("slate");
        let jobs = Family::<StateLabel, Gauge>::default();
        let queue_depth = Family::<PoolLabel, Gauge>::default();
        let warm_vms = Family::<PoolLabel, Gauge>::default();
        let provision_seconds = Family::<PoolLabel, Histogram>::new_with_constructor(
            provision_buckets as fn() -> Histogram,
        );
        let job_seconds =
            Family::<PoolLabel, Histogram>::new_with_constructor(job_buckets as fn() -> Histogram);
        let webhooks = Family::<ResultLabel, Counter>::default();
        let status_reports = Family::<ResultLabel, Gauge>::default();
        let leaked_workers_cleaned = Counter::default();
        let image_rebuilds = Family::<ImageResultLabel, Counter>::default();
        registry.register(
            "image_rebuilds",
            "Scheduled image rebuilds by image and result",
            image_rebuilds.clone(),
        );
        registry.register("jobs", "Jobs by state", jobs.clone());
        registry.register("queue_depth", "Queued jobs per pool", queue_depth.clone());
        registry.register(
            "warm_vms",
            "VMs booted and idle, waiting for a job, per pool",
            warm_vms.clone(),
        );
        registry.register(
            "provision_duration_seconds",
            "Time to provision a worker",
            provision_seconds.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Time from provisioning to the end of a job",
            job_seconds.clone(),
        );
        registry.register("webhooks", "Webhook deliveries by result", webhooks.clone());
        registry.register(
            "status_reports",
            "Commit status deliveries by result",
            status_reports.clone(),
        );
        registry.register(
            "leaked_workers_cleaned",
            "Workers found without a live job and destroyed",
            leaked_workers_cleaned.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            jobs,
            queue_depth,
            warm_vms,
            provision_seconds,
            job_seconds,
            webhooks,
            status_reports,
            leaked_workers_cleaned,
            image_rebuilds,
        }
    }

    pub fn image_rebuild(&self, image: &str, result: &str) {
        self.image_rebuilds
            .get_or_create(&ImageResultLabel {
                image: image.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    pub fn webhook(&self, result: &str) {
        self.webhooks
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let reg = self.registry.lock().unwrap();
        prometheus_client::encoding::text::encode(&mut out, &reg).expect("writing to a string");
        out
    }
}
