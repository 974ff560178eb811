//! Test certificates: a CA and the server and client certificates it signs,
//! for the control plane's TLS and mutual TLS (rustls verifies them as it
//! would real ones).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its private key, PEM.
#[derive(Clone, Debug)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertKey {
    /// Writes `<name>.crt` and `<name>.key` into `dir`; returns their paths.
    #[must_use]
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert_pem).expect("writing a test certificate");
        std::fs::write(&key, &self.key_pem).expect("writing a test key");
        (cert, key)
    }
}

/// A certificate authority of its own (valid from 1975 to 4096: rcgen's
/// default, so no test depends on the clock).
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A new CA named `name`, with a new key.
    #[must_use]
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().expect("generating a CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signing the CA");
        Self { issuer }
    }

    /// The CA's certificate, PEM: what a server or client trusts.
    #[must_use]
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes `<name>.crt` (the CA certificate) into `dir`; returns its path.
    #[must_use]
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.crt"));
        std::fs::write(&path, self.cert_pem()).expect("writing a test CA");
        path
    }

    /// A server certificate for `names` (DNS names or IP addresses, e.g.
    /// "localhost", "127.0.0.1").
    #[must_use]
    pub fn server(&self, names: &[&str]) -> CertKey {
        self.leaf(
            names,
            names.first().copied().unwrap_or("server"),
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose common name (and DNS name) is `name`,
    /// e.g. the node name.
    #[must_use]
    pub fn client(&self, name: &str) -> CertKey {
        self.leaf(&[name], name, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, names: &[&str], common_name: &str, usage: ExtendedKeyUsagePurpose) -> CertKey {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("valid test names");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("generating a key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("signing a test certificate");
        CertKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}
